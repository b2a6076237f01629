"""benchmarks/paired.py: the paired per-case comparison the benchmark READMEs quote."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def write_per_case(path: Path, rows: list[tuple[str, str, str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("case,class,dsc,nsd,hd95\n" + "".join(f"{c},1,{d},{n},{h}\n" for c, d, n, h in rows))
    return path


def test_a_lower_hd95_counts_as_better_and_undefined_values_are_counted(tmp_path):
    a = write_per_case(tmp_path / "a" / "seed_0" / "fold_0" / "per_case.csv",
                       [("c1", "0.9", "0.8", "1.0"), ("c2", "0.7", "0.6", "0.5"), ("c3", "0.5", "0.5", "")])
    b = write_per_case(tmp_path / "b" / "seed_0" / "fold_0" / "per_case.csv",
                       [("c1", "0.8", "0.9", "3.0"), ("c2", "0.8", "0.6", "1.0"), ("c3", "0.4", "0.4", "2.0")])

    def run(metric: str) -> str:
        result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "paired.py"), "--metric", metric,
                                 "--a", str(a), "--b", str(b)], capture_output=True, text=True, check=True)
        return result.stdout.split(": ", 1)[1].strip()

    # DSC differences +0.1, -0.1, +0.1 (x 100): mean +3.33, A better on 2 of 3
    assert run("dsc") == "+3.33 ± 11.55 (dsc), A better on 2/3 cases (undefined values: A 0, B 0)"
    # HD95 (mm, not scaled) differences -2 and -0.5 over the 2 defined cases: lower is better, so A on both
    assert run("hd95") == "-1.25 ± 1.06 (hd95), A better on 2/2 cases (undefined values: A 1, B 0)"
