"""The resident-memory probe: the marks follow memory the work touches, and probe processes hand
back their last JSON line. The marks are read in a fresh process, as the probes are meant to run:
in the warm test process the allocator reuses freed memory and the marks barely move."""

import sys
import textwrap

import pytest

from recpeft.utils.memory_probe import (
    MALLOC_MMAP_THRESHOLD,
    can_measure_memory,
    describe_peak_memory,
    resident_kib,
    run_json_subprocesses,
)

MIB = 2**20
needs_proc = pytest.mark.skipif(not can_measure_memory(), reason="needs Linux /proc/self/clear_refs")

PROBE = textwrap.dedent("""
    import json
    from recpeft.utils.memory_probe import measure_peak_memory, resident_growth

    MIB = 2 ** 20

    def touched(mib):
        return b"\\x01" * (mib * MIB)  # written, so resident (a zeroed block may stay unmapped)

    kept, kept_peak, kept_retained = resident_growth(lambda: touched(64))
    del kept
    size, freed_peak, freed_retained = resident_growth(lambda: len(touched(64)))  # freed inside the call
    figures = measure_peak_memory(lambda: touched(32), lambda built, i: len(touched(64)), steps=2)
    print(json.dumps({"kept": [kept_peak, kept_retained], "freed": [freed_peak, freed_retained], "size": size,
                      **figures}))
""")


@needs_proc
def test_marks_follow_touched_memory_in_a_fresh_process():
    assert resident_kib("VmHWM") >= resident_kib("VmRSS") > 0
    (result,) = run_json_subprocesses([[sys.executable, "-c", PROBE]], timeout=120)
    kept_peak, kept_retained = result["kept"]
    assert kept_peak >= 60 * MIB and kept_retained >= 60 * MIB
    freed_peak, freed_retained = result["freed"]
    assert result["size"] == 64 * MIB and freed_peak >= 60 * MIB and freed_retained < 16 * MIB
    assert result["model_bytes"] >= 30 * MIB
    assert result["training_bytes"] >= 60 * MIB
    assert result["peak_bytes"] == result["model_bytes"] + result["training_bytes"]
    assert result["build_peak_bytes"] >= result["model_bytes"] - MIB
    assert result["step_s_in_probe"] >= 0
    assert "over 2 training steps" in describe_peak_memory(2)


def test_run_json_subprocesses_reads_the_last_line_and_names_failures():
    ok = [
        sys.executable,
        "-c",
        "import json, os; print('noise'); print(json.dumps({'threshold': os.environ['MALLOC_MMAP_THRESHOLD_']}))",
    ]
    assert run_json_subprocesses([ok, ok]) == [{"threshold": MALLOC_MMAP_THRESHOLD}] * 2
    failing = [sys.executable, "-c", "import sys; sys.exit('probe broke')"]
    with pytest.raises(RuntimeError, match=r"(?s)failed \(exit 1\).*probe broke"):
        run_json_subprocesses([ok, failing])
