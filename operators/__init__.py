"""Pure operators: Arrow tables / numpy arrays in, Arrow tables / numpy arrays out.

Nothing in this package imports ray; `pipeline/` adapts operators to Ray.
"""
