"""Local training in torch: models, the site's trainer and evaluation metrics."""
