"""Training the demo model committed in demo/ (see demo/README.md); serving never imports this."""
