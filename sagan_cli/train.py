"""placeholder"""
def print_recipe(r, d): print(r)
def run_training(r, d, resume=False): pass
