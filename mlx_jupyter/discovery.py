"""Environment variables through which a Jupyter server tells its kernels where mlx_jupyter is served."""

# Set by the server extension in the server's own environment once it listens; kernels
# the server starts inherit them. The token is the server's Jupyter token ('' when the
# server has none).
ENV_URL = "MLX_JUPYTER_SERVER_URL"
ENV_TOKEN = "MLX_JUPYTER_TOKEN"
