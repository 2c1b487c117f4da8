"""tests/lua uses the suite's fixtures (tests/conftest.py); this only gives support.py's asserts pytest's
detailed failure messages."""

import pytest

pytest.register_assert_rewrite("tests.lua.support")
