"""Whole test modules run unchanged on the Redis Cluster: expiry, idempotency, the sold-out fast path,
the live dashboard's figures (pipelines over every shard, so over every node), rebuilds from PostgreSQL and
the write-behind worker. Star imports on purpose: every test added to those
modules runs here too."""

from tests.api.test_dashboard import *  # noqa: F403
from tests.api.test_expiry import *  # noqa: F403
from tests.api.test_idempotency import *  # noqa: F403
from tests.api.test_sold_out import *  # noqa: F403
from tests.api.test_sold_out import test_a_known_sold_out_sku_is_refused_without_redis
from tests.recovery.test_rebuild import *  # noqa: F403
from tests.worker.test_consumer import *  # noqa: F403

# It pauses the server with CLIENT PAUSE, a command a cluster client cannot send without naming nodes;
# what it shows (refusals from memory while Redis is away) does not depend on the topology.
del test_a_known_sold_out_sku_is_refused_without_redis
