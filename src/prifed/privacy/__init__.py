"""Differential privacy for PriFed: DP-SGD, DP-FedAvg, accounting and budgets.

Modules:

- :mod:`~prifed.privacy.accountant`: epsilon of Gaussian mechanisms with
  dp-accounting (RDP, PLD) and noise calibration;
- :mod:`~prifed.privacy.settings`: the DP settings a coordinator proposes;
- :mod:`~prifed.privacy.policy` and :mod:`~prifed.privacy.ledger`: the site's
  own limit and its append-only record of spend;
- :mod:`~prifed.privacy.validation`: layers DP-SGD cannot train, by name;
- :mod:`~prifed.privacy.dpsgd`: record-level DP-SGD through Opacus;
- :mod:`~prifed.privacy.sitelevel`: site-level clipping, noise and noise shares;
- :mod:`~prifed.privacy.client` and :mod:`~prifed.privacy.strategy`: the site
  and coordinator sides of a DP round;
- :mod:`~prifed.privacy.federation`: options, site folders and the run summary;
- :mod:`~prifed.privacy.attack`: loss-threshold membership inference;
- :mod:`~prifed.privacy.cli`: the ``prifed privacy`` commands.

Modes, trust assumptions and limitations are in docs/privacy.md.
"""
