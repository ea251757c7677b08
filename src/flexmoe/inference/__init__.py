"""Layer 5, inference: running a merged model: generate with attribution, request-level
preselection, bits per byte."""
