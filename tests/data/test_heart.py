"""The shipped heart data follows FLamby's preparation."""

import hashlib

from prifed.data.heart import heart_csv_path
from prifed.sitedata import prepare_sites

SHA256 = "574f2fa2b43012fa25fca4fcdb36bd7c6bccdd0af4242f6c0e4c8633c5a072ae"


def test_shipped_csv_checksum():
    assert hashlib.sha256(heart_csv_path().read_bytes()).hexdigest() == SHA256


def test_four_centres_with_flamby_split_sizes():
    sites = prepare_sites(None, None, seed=43)
    sizes = {s.name: (s.train_y.size, s.test_y.size) for s in sites}
    # FLamby's 0.66 train fraction on 304, 260, 46 and 130 complete rows.
    assert sizes == {"Cleveland": (200, 104), "Hungary": (171, 89),
                     "Switzerland": (30, 16), "VA Long Beach": (85, 45)}
    assert all(s.train_x.shape[1] == 13 for s in sites)


def test_switzerland_is_nearly_all_positive():
    sites = {s.name: s for s in prepare_sites(None, None, seed=43)}
    swiss = sites["Switzerland"]
    assert swiss.train_y.sum() + swiss.test_y.sum() == 45
