"""The convexity heatmap: the grid and its pricing (grid), the vectorised tile math (tile_vec),
staging of dirty tiles (tile_builder) and versioned publication with diffs (publisher)."""
