"""The HTTP contention tests, run unchanged on a Redis Cluster: the scripts are the same, each call one slot."""

from tests.api.test_contention import (
    test_100_units_random_quantities_never_above_stock,
    test_2000_buyers_one_bottle_exactly_one_winner,
    test_limit_counts_across_reservations_and_frees_on_release,
    test_one_user_50_parallel_requests_gets_at_most_the_limit,
)

__all__ = [
    "test_100_units_random_quantities_never_above_stock",
    "test_2000_buyers_one_bottle_exactly_one_winner",
    "test_limit_counts_across_reservations_and_frees_on_release",
    "test_one_user_50_parallel_requests_gets_at_most_the_limit",
]
