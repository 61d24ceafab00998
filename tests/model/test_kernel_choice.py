"""Kernel plans: measured on the model's shapes, cached per machine, never cached from a busy run."""

from __future__ import annotations

import pytest

from layerserve.model import kernel_choice
from layerserve.model.kernel_choice import CpuFeatures, KernelPlan, choose_kernels

SHAPES = [(64, 64, 4), (96, 64, 2)]  # tiny (N, K, most rows): the measurement takes milliseconds


class FixedWatch:
    """Reports a fixed amount of other processes' CPU."""

    others = 0.0

    def start(self) -> None:
        pass

    def stop(self) -> float:
        return self.others


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERSERVE_CACHE", str(tmp_path))
    monkeypatch.setattr(kernel_choice, "CpuWatch", FixedWatch)
    return tmp_path


def plans(cache) -> list:
    return sorted((cache / "kernels").glob("plan-*.json")) if (cache / "kernels").exists() else []


def test_a_quiet_measurement_is_cached_and_read_back(cache):
    cpu = CpuFeatures.detect()
    FixedWatch.others = 0.0
    plan = choose_kernels(SHAPES, quantized=False, cpu=cpu)
    assert len(plans(cache)) == 1
    assert set(plan.choices) == {"64x64", "96x64"}
    assert [rows for rows, _ in plan.choices["64x64"]] == [1, 2, 4]  # every bucket up to the most rows
    again = choose_kernels(SHAPES, quantized=False, cpu=cpu)
    assert again.choices == plan.choices and again.timings == plan.timings


def test_a_measurement_on_a_busy_machine_is_used_but_not_cached(cache):
    FixedWatch.others = 1.0  # another process kept a core busy: the timings mean little
    plan = choose_kernels(SHAPES, quantized=False)
    assert plan.choices and plans(cache) == []


def test_bf16_is_never_a_candidate_where_the_cpu_only_emulates_it():
    avx2 = CpuFeatures("an AVX2 host", frozenset({"avx2", "fma"}))
    assert "bf16" not in kernel_choice.candidates(avx2, quantized=False)
    amx = CpuFeatures("an AMX host", frozenset({"avx2", "avx512f", "amx_bf16"}))
    assert "bf16" in kernel_choice.candidates(amx, quantized=False)


def test_a_plan_picks_per_bucket_and_covers_larger_batches():
    plan = KernelPlan({"8x32": [(1, "q4"), (16, "bf16"), (512, "f32")]})
    assert [plan.kernel_for(8, 32, rows) for rows in (1, 2, 16, 17, 4096)] == ["q4", "bf16", "bf16", "f32", "f32"]
    assert KernelPlan.from_json(plan.to_json()).choices == plan.choices
