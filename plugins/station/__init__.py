"""The reading station: radiologists read a reader-study design in the browser (perceptcore read)."""
