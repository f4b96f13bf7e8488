"""Published weight formats: readers and key maps, one module per source."""
