"""Region tables and gain maps on toy grids with known answers, region mask files, and figures."""

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from topoflow.corpus.schema import CorpusError
from topoflow.figures import (
    default_query_patch,
    elevation_bias_row,
    plot_attention_bias,
    plot_gain_bars,
    plot_gain_maps,
    plot_val_loss_curves,
)
from topoflow.regions import (
    elevation_bands,
    format_region_table,
    gain_map,
    load_region_mask,
    region_report,
    region_table,
    regions_from_corpus,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_elevation_bands_put_edges_in_the_band_above():
    z = np.array([[0.0, 199.9, 200.0, 999.0], [1000.0, 2999.0, 3000.0, 5000.0]])
    codes, names = elevation_bands(z)
    assert codes.tolist() == [[0, 0, 1, 1], [2, 2, 3, 3]]
    assert names == {0: "< 200 m", 1: "200-1000 m", 2: "1000-3000 m", 3: ">= 3000 m"}
    with pytest.raises(ValueError, match="increasing"):
        elevation_bands(z, (1000.0, 200.0))


def _toy_sums():
    """2 variables on a 2 x 2 grid; band 0 = left column (low), band 1 = right column (high)."""
    count = np.full((2, 2, 2), 4.0)
    count[1, 1, 1] = 0.0  # o3 never valid at the top-right cell
    control = np.array([[[4.0, 16.0], [4.0, 16.0]], [[8.0, 8.0], [8.0, 0.0]]])
    arm = np.array([[[4.0, 4.0], [4.0, 4.0]], [[8.0, 2.0], [8.0, 0.0]]])
    elevation = np.array([[100.0, 2000.0], [150.0, 4000.0]])
    return control, arm, count, elevation


def test_region_table_pools_squared_errors_per_band():
    control, arm, count, elevation = _toy_sums()
    codes, names = elevation_bands(elevation, (1000.0,))
    rows = region_table(control, count, torch.as_tensor(arm), count, codes, names, ["pm25", "o3"])
    by = {(r.region, r.variable): r for r in rows}
    low, high = by[("< 1000 m", "pm25")], by[(">= 1000 m", "pm25")]
    assert (low.n_cells, low.n_values) == (2, 8)
    assert low.rmse_control == pytest.approx(1.0) and low.gain == pytest.approx(0.0)
    assert high.rmse_control == pytest.approx(2.0) and high.rmse_arm == pytest.approx(1.0)
    assert high.gain == pytest.approx(0.5)
    o3_high = by[(">= 1000 m", "o3")]
    assert o3_high.n_values == 4  # the never-valid cell adds nothing
    assert (o3_high.n_cells, o3_high.n_cells_with_data) == (2, 1)
    assert o3_high.rmse_control == pytest.approx(np.sqrt(8 / 4))
    assert o3_high.gain == pytest.approx(1 - np.sqrt(2 / 4) / np.sqrt(8 / 4))
    table = format_region_table(rows, title="elevation band")
    assert "| >= 1000 m | 2 (2) | +50.00% | +50.00% |" in table
    assert table.splitlines()[0] == "| elevation band | cells (with data) | pm25 gain | o3 gain |"


def test_region_table_refuses_unpaired_counts_and_bad_shapes():
    control, arm, count, elevation = _toy_sums()
    codes, names = elevation_bands(elevation)
    other = count.copy()
    other[0, 0, 0] = 3.0
    with pytest.raises(ValueError, match="counts differ"):
        region_table(control, count, arm, other, codes, names, ["pm25", "o3"])
    with pytest.raises(ValueError, match="region codes shape"):
        region_table(control, count, arm, count, codes[:1], names, ["pm25", "o3"])


def test_gain_map_per_cell_with_nan_where_undefined():
    control, arm, count, _ = _toy_sums()
    gain = gain_map(control, count, arm, count)
    assert gain[0, 0, 1] == pytest.approx(0.5)
    assert gain[0, 0, 0] == pytest.approx(0.0)
    assert np.isnan(gain[1, 1, 1])


def test_load_region_mask_from_npy_and_safetensors(tmp_path):
    codes = np.array([[0, 1], [2, 2]], dtype=np.int32)
    np.save(tmp_path / "basins.npy", codes)
    loaded, names = load_region_mask(tmp_path / "basins.npy", names={2: "plain"}, grid_shape=(2, 2))
    assert loaded.tolist() == codes.tolist()
    assert names == {0: "region 0", 1: "region 1", 2: "plain"}
    np.save(tmp_path / "sichuan.npy", codes == 1)
    _, bool_names = load_region_mask(tmp_path / "sichuan.npy")
    assert bool_names == {0: "outside", 1: "sichuan"}
    save_file(
        {"region_id": codes},
        str(tmp_path / "r.safetensors"),
        metadata={"regions": json.dumps({"0": "sea", "1": "basin", "2": "plateau"})},
    )
    _, st_names = load_region_mask(tmp_path / "r.safetensors")
    assert st_names == {0: "sea", 1: "basin", 2: "plateau"}
    save_file({"a": codes, "b": codes}, str(tmp_path / "two.safetensors"))
    with pytest.raises(KeyError, match="single tensor"):
        load_region_mask(tmp_path / "two.safetensors")
    with pytest.raises(ValueError, match="grid"):
        load_region_mask(tmp_path / "basins.npy", grid_shape=(3, 2))
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        load_region_mask(tmp_path / "missing.npy")


def test_regions_from_corpus_reads_static_and_metadata(synthetic_corpus):
    region_id, names = regions_from_corpus(synthetic_corpus)
    # The synthetic corpus marks its eastern column as sea (code 0), the rest land (code 1).
    assert region_id[:, -1].tolist() == [0] * region_id.shape[0]
    assert (region_id[:, :-1] == 1).all()
    assert names == {0: "sea", 1: "land"}


def test_regions_from_corpus_refuses_a_flipped_static_byte(synthetic_corpus, tmp_path):
    import shutil

    corpus = tmp_path / "corpus"
    shutil.copytree(synthetic_corpus, corpus)
    static = corpus / "static.safetensors"
    data = bytearray(static.read_bytes())
    data[-1] ^= 0x01
    static.write_bytes(bytes(data))
    with pytest.raises(CorpusError, match="static.safetensors: sha256"):
        regions_from_corpus(corpus)


def test_bias_row_follows_the_design_formula():
    z = np.array([[0.0, 1000.0, 30000.0]])
    row = elevation_bias_row(z, (0, 1), alpha=1.0, h_scale_m=1000.0)[0]
    assert row.tolist() == [0.0, 0.0, -10.0]  # downhill free, equal free, clamp at -10
    row = elevation_bias_row(z, (0, 0), alpha=1.0, h_scale_m=1000.0, clamp_max=100.0)[0]
    assert row.tolist() == [0.0, -1.0, -30.0]


def _toy_terrain() -> np.ndarray:
    """A 16 x 32 grid: plateau (4000 m) in the west, a basin (300 m) east of it, plain beyond."""
    z = np.full((16, 32), 50.0)
    z[:, :10] = 4000.0
    z[4:12, 10:18] = 300.0
    z[2:4, 10:18] = z[12:14, 10:18] = 2500.0
    return z


def test_default_query_patch_is_a_low_patch_beside_the_range():
    z = _toy_terrain()
    query = default_query_patch(z)
    rows, cols = np.nonzero(z >= 4000.0)
    nearest = np.min(np.maximum(np.abs(rows - query[0]), np.abs(cols - query[1])))
    assert z[query] <= 300.0 and nearest <= 3


def test_figures_write_pngs(tmp_path):
    z = _toy_terrain()
    rng = np.random.default_rng(0)
    curves = {
        arm: {
            s: ([0, 10, 20], 0.4 - 0.01 * np.arange(3) + 0.001 * rng.normal(size=3))
            for s in range(3)
        }
        for arm in ("control", "topoflow")
    }
    gain = 0.05 * rng.normal(size=(2, 16, 32))
    gain[:, 0, 0] = np.nan
    entries = [
        {"variable": v, "lead_hours": h, "gain": 0.02, "ci_low": 0.0, "ci_high": 0.04}
        for v in ("pm25", "o3")
        for h in (12, 24)
    ]
    paths = [
        plot_val_loss_curves(curves, tmp_path / "curves.png", baseline=0.4, threshold=0.35),
        plot_gain_maps(gain, ["pm25", "o3"], tmp_path / "maps" / "gain.png", elevation_m=z),
        plot_gain_bars(entries, tmp_path / "bars.png"),
        plot_attention_bias(z, tmp_path / "bias.png", patch_size=2, alpha=2.0, h_scale_m=1000.0),
    ]
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, path
    at_basin = plot_attention_bias(
        z,
        tmp_path / "b2.png",
        patch_size=2,
        alpha=1.0,
        h_scale_m=500.0,
        query_latlon=(8.0, 14.0),
        extent=(0.0, 32.0, 0.0, 16.0),
    )
    assert at_basin.read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(ValueError, match="outside the grid extent"):
        plot_attention_bias(
            z,
            tmp_path / "b3.png",
            patch_size=2,
            alpha=1.0,
            h_scale_m=500.0,
            query_latlon=(40.0, 14.0),
            extent=(0.0, 32.0, 0.0, 16.0),
        )
    with pytest.raises(ValueError, match="gain: expected"):
        plot_gain_maps(gain, ["pm25"], tmp_path / "bad.png")


def test_region_report_from_metrics_states_gives_both_tables():
    control, arm, count, elevation = _toy_sums()
    c_state = {"cell_sq_err": torch.as_tensor(control), "cell_count": torch.as_tensor(count)}
    a_state = {"cell_sq_err": torch.as_tensor(arm), "cell_count": torch.as_tensor(count)}
    codes = np.array([[1, 2], [1, 2]])
    report = region_report(
        c_state,
        a_state,
        ["pm25", "o3"],
        elevation_m=elevation,
        region_codes=codes,
        region_names={1: "basin", 2: "plateau"},
    )
    assert len(report["elevation_band"]) == 4 * 2
    plateau = [r for r in report["region"] if r["region"] == "plateau" and r["variable"] == "pm25"]
    assert plateau[0]["gain"] == pytest.approx(0.5)
    assert "| plateau | 2 (2) | +50.00% |" in report["markdown"]
