"""The README.md of a GGUF export: what the files are, and how to run them in llama.cpp and Ollama."""

from __future__ import annotations

from .. import __version__
from .source import SourceModel

__all__ = ["model_card"]


def _files_table(files: dict, n_params: int) -> list[str]:
    rows = ["| file | type | size | bits/weight | importance matrix |", "|---|---|---:|---:|---|"]
    for name, f in files.items():
        rows.append(f"| `{f['file']}` | {name} | {f['bytes'] / 1e6:,.1f} MB | {f['bytes'] * 8 / max(n_params, 1):.2f} "
                    f"| {'yes' if f['imatrix'] else 'no'} |")
    return rows


def model_card(model: SourceModel, prov: dict) -> str:
    d = prov["method_details"]
    files, conv, im = d["files"], d["converter"], d.get("imatrix")
    base = model.repo_id or model.path.name
    src = f"{model.repo_id} @ {model.commit}" if model.repo_id else str(model.path)
    first = next((f["file"] for t, f in files.items() if t != "BF16"), next(iter(files.values()))["file"])
    lines = [
        "---",
        f"base_model: {base}",
        "tags: [qtk, gguf, llama.cpp, quantized]",
        "---",
        f"# {base} — GGUF {', '.join(files)}",
        "",
        f"Made with qtk {__version__} on {prov['device']} in {prov['wall_s']:.0f} s: converted by llama.cpp's "
        f"`convert_hf_to_gguf.py` (llama.cpp {conv['llama_cpp_commit']}, carried by qtk), quantized by "
        f"`llama_model_quantize` (llama-cpp-python {prov['versions'].get('llama-cpp-python', '?')}).",
        "",
        f"Source: {src}",
        "",
        *_files_table(files, model.num_params),
        "",
    ]
    if im:
        cal = prov["calibration"]
        lines += [f"Importance matrix: `{im['file']}` (llama-imatrix's GGUF format), {im['chunk_count']} samples x "
                  f"{im['chunk_size']} tokens of `{cal['name']}` (sha256 {cal['sha256'][:16]}…, seed {cal['seed']}, "
                  f"chat template {'on' if cal['chat_template'] else 'off'}), {im['entries']} matrices. "
                  "`llama-quantize --imatrix` reads it to make other types from a BF16 conversion.", ""]
    else:
        lines += ["No importance matrix (--no-imatrix, or only types that do not use one).", ""]
    lines += [
        "## Run it",
        "",
        "llama.cpp:",
        "```sh",
        f"llama-cli -m {first} -cnv          # chat in the terminal (the chat template is in the file)",
        f"llama-server -m {first} --port 8080  # OpenAI-compatible server",
        "```",
        "",
        "Ollama (the `Modelfile` in this folder):",
        "```sh",
        f"ollama create {base.split('/')[-1].lower()} -f Modelfile",
        f"ollama run {base.split('/')[-1].lower()}",
        "```",
        "",
        "Python (llama-cpp-python):",
        "```python",
        "from llama_cpp import Llama",
        f"llm = Llama(model_path=\"{first}\", n_ctx=4096)",
        "print(llm.create_chat_completion([{\"role\": \"user\", \"content\": \"Hello\"}])[\"choices\"][0][\"message\"])",
        "```",
        "",
        f"Check it against the original with `qtk verify {base} {first}`. Full record: `qtk_provenance.json`.",
        "",
    ]
    return "\n".join(lines)
