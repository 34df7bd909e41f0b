"""Development tools: the coglet runner and client, schema generation, config and image checks;
serving code never imports this, and `cog build` leaves it out of the image."""
