import pytest

from loraplex.training.adapter_id import internal_name, validate_adapter_id
from loraplex.training.errors import InvalidAdapterId


@pytest.mark.parametrize("good", ["acme", "acme-fiscal", "Tenant_7.v2", "double", "0abc"])
def test_safe_ids_pass_and_map_to_distinct_module_safe_names(good):
    assert validate_adapter_id(good) == good
    name = internal_name(good)
    assert name.isidentifier() and name.startswith("t_") and name != good


@pytest.mark.parametrize(
    "bad", ["", "../etc", "a/b", "/abs", "a\\b", "a..b", ".hidden", "x\n", "a b", "x" * 200, "é", None, 7]
)
def test_unsafe_ids_are_refused_with_a_reason(bad):
    with pytest.raises(InvalidAdapterId):
        validate_adapter_id(bad)


def test_internal_names_do_not_collide():
    ids = [f"tenant-{i}" for i in range(1000)] + ["double", "float", "train"]
    assert len({internal_name(i) for i in ids}) == len(ids)
