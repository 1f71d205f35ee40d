"""``drbench profile`` and ``drbench list models``, as a user runs them."""

import json

import pytest
import torch
from typer.testing import CliRunner

from drbench.cli import app
from drbench.measure.complexity import complexity
from drbench.measure.timing import fixed_threads
from drbench.models import create_model

runner = CliRunner()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Counting does not depend on threads; on a shared 2-core machine, threads contend and slow tracing down."""
    with fixed_threads(1):
        yield


def test_json_is_one_object_with_the_counts_and_the_arguments():
    args = ["profile", "mobilenetv1", "--width", "0.25", "--op", "drconv", "--regions", "4", "--input-size", "32",
            "--json"]
    # The fast region_conv2d's executed FLOPs depend on the region sizes, so both sides draw the same weights.
    torch.manual_seed(0)
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    torch.manual_seed(0)
    expected = complexity(create_model("mobilenetv1", width=0.25, op="drconv", regions=4, input_size=32), 32)
    assert (data["macs"], data["params"], data["executed_flops"]) == (
        expected.macs, expected.params, expected.executed_flops
    )
    assert data["model"] == "mobilenetv1" and data["width"] == 0.25 and data["op"] == "drconv"
    assert data["op_options"] == {"regions": 4} and data["placement"] == "default"
    assert data["input_size"] == [3, 32, 32] and data["batch_size"] == 1 and data["unsupported_ops"] == {}
    assert "by_layer" not in data


def test_json_by_layer_and_batch_size():
    result = runner.invoke(app, ["profile", "mobilenetv1", "--width", "0.25", "--input-size", "32x48",
                                 "--batch-size", "2", "--by-layer", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["input_size"] == [3, 32, 48] and data["batch_size"] == 2
    assert [layer["name"] for layer in data["by_layer"]][:2] == ["stem", "block1"]


def test_table_shows_totals_and_the_stage_breakdown():
    result = runner.invoke(app, ["profile", "mobilefacenet", "--op", "condconv", "--experts", "4",
                                 "--input-size", "112x96", "--by-layer"], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    for text in ("MACs", "params", "executed FLOPs", "experts=4", "input 3x112x96", "stage3", "gdconv"):
        assert text in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["profile", "resnet"], "unknown model 'resnet'"),
        (["profile", "shufflenetv2", "--width", "0.7"], "no width 0.7"),
        (["profile", "shufflenetv2", "--regions", "8"], "--regions applies to --op drconv"),
        (["profile", "shufflenetv2", "--op", "drconv", "--experts", "8"], "--experts applies to --op condconv"),
        (["profile", "shufflenetv2", "--input-size", "big"], "--input-size must be a positive size"),
        (["profile", "mobilenetv2", "--op", "drconv", "--placement", "all", "--input-size", "32"], "groups=1 only"),
    ],
)
def test_user_errors_exit_2_with_one_line(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_list_models_shows_families_and_placements():
    result = runner.invoke(app, ["list", "models"], env={"COLUMNS": "160"})
    assert result.exit_code == 0
    for text in ("shufflenetv2", "mobilenetv2", "mobilenetv1", "mobilefacenet", "right_branch", "last3"):
        assert text in result.stdout
