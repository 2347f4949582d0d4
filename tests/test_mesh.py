"""mesh_shape / layout -> Mesh and PartitionSpecs, and the errors for layouts that cannot work."""

import warnings

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from neo.errors import NeoError
from neo.mesh import LayoutOrderWarning, UnknownAxisWarning, make_layout, parse_layout, parse_mesh_shape, suggest_mesh_shape


def test_parse_mesh_shape_separators_and_fill():
    assert parse_mesh_shape("x:2,y:4", 8) == (("x", 2), ("y", 4))
    assert parse_mesh_shape("x:2.y:4", 8) == parse_mesh_shape("x:2; y:4", 8)
    assert parse_mesh_shape("data:-1,model:2", 8) == (("data", 4), ("model", 2))
    assert parse_mesh_shape("", 8) == (("x", 8),)


def test_mesh_over_devices():
    layout = make_layout("x:2,y:4", "batch:x,embd:y,heads:y,vocab:y")
    assert dict(layout.mesh.shape) == {"x": 2, "y": 4}
    assert layout.mesh.devices.size == 8


def test_mesh_size_mismatch_says_both_numbers_and_suggests():
    with pytest.raises(NeoError, match=r"needs 256 devices but 8 are available.*\"x:4,y:2\""):
        make_layout("x:128,y:2", "batch:x,embd:y")
    assert suggest_mesh_shape((("x", 64), ("y", 4)), (("batch", "x"),), 8) == "x:2,y:4"


def test_layout_errors():
    with pytest.raises(NeoError, match=r"'batch' is mapped to two mesh axes \('x' and 'y'\)"):
        parse_layout("batch:x,batch:y", ["x", "y"])
    # a mesh axis mesh_shape lacks: skipped, as mesh-tf did (GPT-Neo's Colab config has vocab:n_vocab), and said
    with pytest.warns(UnknownAxisWarning, match=r"mesh axis 'z', which is not in mesh_shape"):
        assert parse_layout("batch:x,vocab:z", ["x", "y"]) == (("batch", "x"),)
    with pytest.raises(NeoError, match=r"'embed' is not a tensor dimension name.*Did you mean 'embd'"):
        parse_layout("embed:y", ["x", "y"])


def test_spec_priority_gives_fsdp():
    layout = make_layout("x:8", "batch:x,embd:x")
    assert layout.spec(("batch", "sequence", "embd")) == P("x", None, None)  # activations: data parallel
    assert layout.spec(("vocab", "embd")) == P(None, "x")  # parameters: sharded along embd
    layout = make_layout("x:2,y:4", "batch:x,embd:y,heads:y")
    assert layout.spec(("embd", "heads", "features_per_head")) == P("y", None, None)


def test_a_weight_dimension_before_batch_on_its_axis_warns():
    # embd:x,batch:x reads like FSDP but splits the activations along embd, not batch
    with pytest.warns(LayoutOrderWarning, match=r"embd:x,heads:x is written before batch:x.*\"batch:x,embd:x,heads:x\""):
        parse_layout("embd:x,heads:x,batch:x,vocab:y", ["x", "y"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parse_layout("batch:x,embd:x", ["x"])  # FSDP
        parse_layout("experts:x,batch:x", ["x"])  # expert parallelism: experts first on purpose
        parse_layout("embd:y,batch:x", ["x", "y"])  # another axis: nothing taken from batch
        parse_layout("heads:y,vocab:y", ["x", "y"])  # no batch at all


def test_rows_split_batch_rows_whatever_the_rank():
    layout = make_layout("x:2,y:4", "batch:x,heads:y")
    assert layout.rows.spec == P("x")
    for shape in ((8,), (8, 5), (8, 3, 2)):
        x = jax.device_put(np.zeros(shape, np.int32), layout.rows)
        assert x.addressable_shards[0].data.shape == (4,) + shape[1:]
    assert make_layout("x:8", "heads:x").rows.spec == P(None)  # batch not split: rows whole


def test_gpu_ids_on_cpu_is_a_clear_error():
    from neo.devices import parse_gpu_ids, select_devices

    assert parse_gpu_ids(["device:GPU:0", "1"]) == [0, 1]
    assert parse_gpu_ids(["0,2"]) == [0, 2]
    with pytest.raises(NeoError, match="JAX sees no GPUs"):
        select_devices(["0"])
    assert len(select_devices([])) == len(jax.devices())
