"""Kernel side: the %%mlx / %mlx magics, the REST client and the notebook widgets."""
