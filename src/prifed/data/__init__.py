"""Site data: reading tables, splitting by site, and federated preprocessing."""
