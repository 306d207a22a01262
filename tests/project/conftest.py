import pytest

from iwb_testkit import make_project


@pytest.fixture
def project():
    return make_project()
