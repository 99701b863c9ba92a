"""The ``text2llm`` command. Each verb parses its flags and calls one function of a stage module.

Heavy libraries (torch, transformers, onnxruntime) are imported inside the verbs that need them,
so ``text2llm --help`` is instant. A :class:`text2llm.errors.UserError` is printed as one line
(``error: ...``) with exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from text2llm import __version__

EPILOG = "Pipeline: clean -> tokenizer train -> pack -> train -> eval / generate / compress / export / serve. " \
         "`text2llm run` does all of it on the bundled TinyStories sample."


# ---- helpers ----------------------------------------------------------------------------------


def _config(path, overrides, preset_section: dict | None = None):
    from text2llm.config import load_config

    extra = [f"{k}={json.dumps(v)}" for k, v in (preset_section or {}).items() if v is not None]
    return load_config(path, extra + list(overrides or []))


def _split_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """Positional args that contain '=' are config overrides; the rest are inputs."""
    over = [i for i in items if "=" in i and not os.path.exists(i)]
    rest = [i for i in items if i not in over]
    return rest, over


def _print_json(obj) -> None:
    print(json.dumps(obj, ensure_ascii=False))


# ---- verbs --------------------------------------------------------------------------------------


def cmd_clean(a) -> int:
    from text2llm.data.pipeline import run_clean

    inputs, over = _split_overrides(a.inputs)
    if not inputs:
        raise _usage("clean: give at least one INPUT file or dir")
    preset = {"data.preset": a.preset} if a.preset else {}
    if a.no_filter:
        preset["data.filter"] = False
    if a.no_dedup:
        preset["data.dedup"] = False
    cfg = _config(a.config, over, preset)
    stats = run_clean(inputs, a.out, cfg.data, workers=a.workers, overwrite=a.overwrite, progress=not a.quiet)
    cfg.save(a.out)
    print(f"kept {stats['docs_out']:,} of {stats['docs_in']:,} documents -> {a.out}")
    return 0


def cmd_tokenizer_train(a) -> int:
    from text2llm.tokenizer import iter_training_texts, train_tokenizer

    inputs, over = _split_overrides(a.inputs)
    if not inputs:
        raise _usage("tokenizer train: give at least one INPUT")
    sect = {"tokenizer.vocab_size": a.vocab_size, "tokenizer.type": a.type}
    cfg = _config(a.config, over, sect)
    tok = train_tokenizer(iter_training_texts(inputs), a.out, cfg.tokenizer, overwrite=a.overwrite)
    print(f"trained {cfg.tokenizer.type} tokenizer with {tok.vocab_size:,} tokens -> {a.out}")
    return 0


def cmd_pack(a) -> int:
    from text2llm.pack import pack

    over = list(a.overrides)
    sect = {"pack.workers": a.workers}
    cfg = _config(a.config, over, sect)
    meta = pack(a.clean_dir, a.tokenizer, a.out, cfg.pack, overwrite=a.overwrite, progress=not a.quiet)
    tr, va = meta["splits"]["train"], meta["splits"]["val"]
    print(f"packed {tr['documents']:,} train docs ({tr['tokens']:,} tokens) and {va['documents']:,} val docs "
          f"({va['tokens']:,} tokens) -> {a.out}")
    return 0


def cmd_train(a) -> int:
    from text2llm.train.trainer import train_from_cli

    config, over = a.config, list(a.overrides)
    if config and "=" in config and not os.path.exists(config):
        config, over = None, [config] + over
    return train_from_cli(config, over, data=a.data, out=a.out, resume=a.resume, overwrite=a.overwrite,
                          progress=not a.quiet)


def cmd_eval(a) -> int:
    from text2llm.artifacts import load
    from text2llm.evaluate import evaluate_text, evaluate_tokens

    if a.tasks:
        return _eval_tasks(a)
    if a.limit is not None or a.include_path or a.num_fewshot is not None:
        raise _usage("eval: --limit, --include-path and --num-fewshot go with --tasks")
    model, tok = load(a.ckpt)
    res = evaluate_tokens(model, a.data) if a.data else evaluate_text(model, tok, a.text)
    if a.json:
        _print_json(res)
    else:
        print(f"loss {res['loss']:.4f}  perplexity {res['perplexity']:.3f}  bits/byte {res['bits_per_byte']:.4f}  "
              f"({res['tokens']:,} tokens, {res['bytes']:,} bytes)")
    return 0


def _eval_tasks(a) -> int:
    from text2llm.errors import require

    require("lm_eval", "eval", "eval --tasks")  # before the model loads
    from text2llm.artifacts import load
    from text2llm.interop.lm_eval import evaluate_tasks

    model, tok = load(a.ckpt)
    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    out = evaluate_tasks(model, tok, tasks, limit=a.limit, include_path=a.include_path, num_fewshot=a.num_fewshot)
    if a.json:
        print(json.dumps(out["results"], default=str))
    else:
        from lm_eval.utils import make_table

        print(make_table(out))
    return 0


COMPILE_HELP = ("PyTorch engine: decode through torch.compile (a first step that compiles for tens of seconds, "
                "then faster steps; worth it for long or many generations)")


def cmd_generate(a) -> int:
    from text2llm.artifacts import open_engine
    from text2llm.errors import UserError
    from text2llm.infer.decoding import cli_loop

    if a.chat and (a.interactive or a.prompt is not None):
        raise _usage("generate: --chat reads the turns from stdin (drop --prompt / --interactive)")
    if a.tp > 1 and (a.interactive or a.chat):
        raise UserError("generate: --interactive / --chat with --tp is not supported (every process would need each "
                        "prompt)")
    served = open_engine(a.ckpt, a.engine or "auto", compile=a.compile, tp=a.tp)
    quiet = a.tp > 1 and int(os.environ.get("RANK", "0")) != 0  # every process decodes; rank 0 prints
    with open(os.devnull, "w") if quiet else contextlib.nullcontext() as sink, \
            contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
        return cli_loop(served.engine, served.tokenizer, a, learned_positions=served.learned_positions)


def cmd_run(a) -> int:
    from text2llm.run import run_pipeline

    config, over = a.config, list(a.overrides)
    if config and "=" in config and not os.path.exists(config):
        config, over = None, [config] + over
    cfg = _config(config, over)
    run_pipeline(cfg, a.out, overwrite=a.overwrite, progress=not a.quiet)
    return 0


def cmd_export_hf(a) -> int:
    from text2llm.interop.hf import export_hf

    out = export_hf(a.ckpt, a.out, overwrite=a.overwrite)
    print(f"exported a Hugging Face model -> {out}")
    return 0


def cmd_import_hf(a) -> int:
    from text2llm.interop.hf import import_hf

    out = import_hf(a.hf_dir, a.out, overwrite=a.overwrite)
    print(f"imported {a.hf_dir} -> {out}")
    return 0


def cmd_export_onnx(a) -> int:
    from text2llm.errors import require

    require(("onnx", "onnxscript", "onnxruntime"), "export", "export onnx")
    from text2llm.interop.onnx import export_onnx

    out = export_onnx(a.ckpt, a.out, int8=a.int8, overwrite=a.overwrite)
    print(f"exported ONNX -> {out}")
    return 0


def cmd_export_gguf(a) -> int:
    from text2llm.interop.gguf import export_gguf

    out = export_gguf(a.ckpt, a.out, type=a.type, overwrite=a.overwrite)
    print(f"exported GGUF ({a.type}) -> {out} (llama.cpp: llama-cli -m {out}; Ollama: FROM {out} in a Modelfile)")
    return 0


def cmd_export_aot(a) -> int:
    from text2llm.infer.aot import export_aot

    out = export_aot(a.ckpt, a.out, max_batch=a.max_batch, overwrite=a.overwrite)
    print(f"compiled the decode step ahead of time -> {out} (run it with `text2llm generate {out}`)")
    return 0


def cmd_compress(a) -> int:
    from text2llm.errors import UserError

    verb = getattr(a, "cverb", None)
    progress = not getattr(a, "quiet", False)
    if verb == "quantize":
        from text2llm.compress.quantize import quantize_checkpoint

        quantize_checkpoint(a.ckpt, a.out, data=a.data, overwrite=a.overwrite)
    elif verb == "prune":
        from text2llm.compress.prune import prune_checkpoint

        prune_checkpoint(a.ckpt, a.out, method=a.method, sparsity=a.sparsity, scope=a.scope,
                         finetune_steps=a.finetune_steps, data=a.data, overwrite=a.overwrite, progress=progress)
    elif verb == "distill":
        from text2llm.compress.distill import distill_checkpoint

        distill_checkpoint(a.teacher, a.student, a.out, overrides=list(a.overrides or []), data=a.data,
                           alpha=a.alpha, temperature=a.temperature, overwrite=a.overwrite, progress=progress,
                           init=a.init)
    else:
        raise UserError("compress: give a METHOD: quantize, prune or distill")
    return 0


def cmd_serve(a) -> int:
    from text2llm.artifacts import open_engine
    from text2llm.infer.server import serve

    serve(open_engine(a.model, compile=a.compile, tp=a.tp), host=a.host, port=a.port,
          max_tokens_limit=a.max_tokens_limit)
    return 0


# ---- parser -------------------------------------------------------------------------------------


def _usage(msg: str):
    from text2llm.errors import UserError

    return UserError(msg)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="text2llm", description="From raw text to a trained, compressed, deployable LLM.",
                                epilog=EPILOG)
    p.add_argument("--version", action="version", version=f"text2llm {__version__}")
    sub = p.add_subparsers(dest="verb", metavar="VERB")

    def verb(name, help_, func, **kw):
        sp = sub.add_parser(name, help=help_, description=help_, **kw)
        sp.set_defaults(func=func)
        return sp

    def common(sp, config=True, overwrite=True):
        if config:
            sp.add_argument("--config", metavar="TOML", help="a config preset (e.g. configs/tiny-cpu.toml)")
        if overwrite:
            sp.add_argument("--overwrite", action="store_true", help="replace a non-empty output dir")
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    s = verb("clean", "raw text (txt / jsonl[.gz] / html / warc) -> cleaned, filtered, deduplicated shards", cmd_clean)
    s.add_argument("inputs", nargs="+", metavar="INPUT", help="files or dirs (a dir's README*, LICENSE* and the like are not read); "
                   "KEY=VALUE items override data.* config")
    s.add_argument("--out", required=True, metavar="DIR", help="output dir for clean-*.jsonl.gz and stats.json")
    s.add_argument("--workers", type=int, default=1, metavar="N", help="worker processes (output is identical for any N)")
    s.add_argument("--preset", choices=["stories", "web-en", "zh"], help="filter set (default: data.preset)")
    s.add_argument("--no-filter", action="store_true", help="skip the quality filters")
    s.add_argument("--no-dedup", action="store_true", help="skip exact and near-duplicate removal")
    common(s)

    t = verb("tokenizer", "tokenizer commands", None)
    tsub = t.add_subparsers(dest="tverb", metavar="COMMAND")
    tt = tsub.add_parser("train", help="train a tokenizer", description="train a tokenizer on cleaned shards or raw files")
    tt.set_defaults(func=cmd_tokenizer_train)
    tt.add_argument("inputs", nargs="+", metavar="INPUT", help="cleaned shard dirs, .jsonl(.gz) files or dirs, .txt files")
    tt.add_argument("--out", required=True, metavar="DIR")
    tt.add_argument("--vocab-size", type=int, metavar="N", help="vocabulary size (default: tokenizer.vocab_size)")
    tt.add_argument("--type", choices=["bpe", "unigram", "bytelevel"], help="SentencePiece bpe/unigram or byte-level BPE")
    common(tt)

    s = verb("pack", "cleaned shards -> token shards (train/val .bin + meta.json)", cmd_pack)
    s.add_argument("clean_dir", metavar="CLEAN_DIR")
    s.add_argument("--tokenizer", required=True, metavar="TOK_DIR")
    s.add_argument("--out", required=True, metavar="DIR")
    s.add_argument("--workers", type=int, metavar="N", help="tokenizer worker processes")
    s.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="pack.* config overrides")
    common(s)

    s = verb("train", "train a model on token shards", cmd_train)
    s.add_argument("config", nargs="?", metavar="CONFIG", help="config preset (TOML); defaults to the built-in tiny-cpu config")
    s.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.lr=1e-3 model.n_layer=4")
    s.add_argument("--data", metavar="TOKENS_DIR", help="token shards from `text2llm pack`")
    s.add_argument("--out", metavar="RUN_DIR", help="run dir (default: runs/train)")
    s.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN_DIR",
                   help="continue the latest checkpoint of RUN_DIR (or of --out)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing run dir")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    s = verb("eval", "loss, perplexity and bits-per-byte of a checkpoint, or lm-evaluation-harness tasks", cmd_eval)
    s.add_argument("ckpt", metavar="CKPT", help="checkpoint dir, or run dir (its latest checkpoint)")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--data", metavar="TOKENS_DIR", help="evaluate the val split of token shards")
    g.add_argument("--text", metavar="FILE", help="evaluate a UTF-8 .txt or a .jsonl[.gz] with a \"text\" field")
    g.add_argument("--tasks", metavar="NAMES",
                   help="lm-evaluation-harness tasks, comma-separated (needs the 'eval' extra). Tasks whose "
                        "dataset is on the Hugging Face hub need it downloaded first: text2llm fetches nothing; "
                        "local task YAMLs (dataset_path: json + data_files) run offline with --include-path")
    s.add_argument("--limit", type=int, default=None, metavar="N", help="with --tasks: at most N examples per task")
    s.add_argument("--include-path", default=None, metavar="DIR", help="with --tasks: a dir of task YAML files")
    s.add_argument("--num-fewshot", type=int, default=None, metavar="K", help="with --tasks: few-shot examples")
    s.add_argument("--json", action="store_true", help="print one JSON line")

    s = verb("generate", "generate text from a checkpoint (or an ONNX export with --engine onnx)", cmd_generate)
    s.add_argument("ckpt", metavar="CKPT", help="checkpoint dir, run dir, ONNX export dir, or AOT export dir")
    s.add_argument("--prompt", default=None, help="prompt text (default: 'Once upon a time')")
    s.add_argument("--max-new-tokens", type=int, default=200, metavar="N")
    s.add_argument("--temperature", type=float, default=0.8, metavar="T", help="0 = greedy")
    s.add_argument("--top-k", type=int, default=50, metavar="K", help="0 = off")
    s.add_argument("--top-p", type=float, default=1.0, metavar="P", help="1 = off")
    s.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R", help="1 = off")
    s.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop when this text appears (repeatable)")
    s.add_argument("--seed", type=int, default=None, metavar="S")
    s.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    s.add_argument("--interactive", action="store_true", help="read prompts from stdin, one per line")
    s.add_argument("--chat", action="store_true",
                   help="chat: every line of stdin is a user turn, answered with the chat template stored "
                        "with the tokenizer (the conversation is kept; its oldest turns go when it outgrows the context)")
    s.add_argument("--system", default=None, metavar="TEXT", help="with --chat: a system message opening the conversation")
    s.add_argument("--engine", choices=["torch", "onnx"], default=None,
                   help="default: by what CKPT holds (an ONNX export dir runs with onnxruntime)")
    s.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    s.add_argument("--tp", type=int, default=1, metavar="N",
                   help="tensor parallel over N processes: run under `torchrun --nproc-per-node N -m text2llm "
                        "generate ...`; each holds a slice of every weight, rank 0 prints")

    s = verb("run", "the whole pipeline on the bundled corpus (or the config's run.inputs)", cmd_run)
    s.add_argument("config", nargs="?", metavar="CONFIG", help="config preset (TOML); default: built-in tiny-cpu")
    s.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    s.add_argument("--out", default="runs/run", metavar="DIR", help="output dir (default: runs/run)")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("-q", "--quiet", action="store_true")

    e = verb("export", "export a checkpoint (Hugging Face dir, ONNX, GGUF, or a compiled decode step)", None)
    esub = e.add_subparsers(dest="everb", metavar="FORMAT")

    def export_format(name, help_, description, func, out="DIR"):
        sp = esub.add_parser(name, help=help_, description=description)
        sp.set_defaults(func=func)
        sp.add_argument("ckpt", metavar="CKPT")
        sp.add_argument("--out", required=True, metavar=out)
        sp.add_argument("--overwrite", action="store_true", help=f"replace an existing {'file' if out != 'DIR' else 'dir'}")
        return sp

    export_format("hf", "a transformers Llama/Mixtral dir", "export to a Hugging Face dir", cmd_export_hf)
    eo = export_format("onnx", "prefill + decode-step ONNX graphs with KV cache",
                       "export to ONNX (runs with onnxruntime alone)", cmd_export_onnx)
    eo.add_argument("--int8", action="store_true", help="also write an onnxruntime int8 model")
    eg = export_format("gguf", "one GGUF file for llama.cpp / Ollama / LM Studio (llama architecture)",
                       "export to GGUF with llama.cpp's own writer (the gguf package): llama architecture, "
                       "the tokenizer and its chat template", cmd_export_gguf, out="FILE.gguf")
    eg.add_argument("--type", choices=["f32", "f16", "q8_0"], default="f32",
                    help="f32 (as trained), f16, or q8_0 (llama.cpp's 8-bit blocks); norms and biases stay f32")
    ea = export_format("aot", "the decode step compiled ahead of time (AOTInductor), with the checkpoint",
                       "compile the decode step once; `generate DIR` / `serve DIR` load it instead of compiling "
                       "in every process", cmd_export_aot)
    ea.add_argument("--max-batch", type=int, default=64, metavar="N",
                    help="largest batch the compiled step takes; larger ones decode eagerly (default 64)")

    i = verb("import", "import a model into a text2llm checkpoint", None)
    isub = i.add_subparsers(dest="iverb", metavar="FORMAT")
    ih = isub.add_parser("hf", help="a transformers Llama/Mixtral dir", description="import a Hugging Face dir")
    ih.set_defaults(func=cmd_import_hf)
    ih.add_argument("hf_dir", metavar="HF_DIR")
    ih.add_argument("--out", required=True, metavar="CKPT_DIR")
    ih.add_argument("--overwrite", action="store_true")

    c = verb("compress", "int8 quantization, pruning, distillation (checkpoint -> checkpoint + report)", None)
    csub = c.add_subparsers(dest="cverb", metavar="METHOD")
    cq = csub.add_parser("quantize", help="int8 Linear layers for CPU inference", description="int8 quantization")
    cq.set_defaults(func=cmd_compress)
    cq.add_argument("ckpt", metavar="CKPT")
    cq.add_argument("--out", required=True, metavar="DIR")
    cq.add_argument("--data", metavar="TOKENS_DIR", help="val shards for the before/after report")
    cq.add_argument("--overwrite", action="store_true")
    cp = csub.add_parser("prune", help="magnitude or structured pruning", description="pruning")
    cp.set_defaults(func=cmd_compress)
    cp.add_argument("ckpt", metavar="CKPT")
    cp.add_argument("--out", required=True, metavar="DIR")
    cp.add_argument("--method", choices=["magnitude", "heads", "ffn"], default="magnitude",
                    help="unstructured magnitude, or structured: attention heads / FFN channels")
    cp.add_argument("--sparsity", type=float, default=0.3, help="share of weights (or heads/channels) removed")
    cp.add_argument("--scope", choices=["global", "layer"], default="global", help="magnitude pruning threshold scope")
    cp.add_argument("--finetune-steps", type=int, default=0, metavar="N", help="short fine-tune afterwards")
    cp.add_argument("--data", metavar="TOKENS_DIR", help="token shards for the fine-tune and the report")
    cp.add_argument("--overwrite", action="store_true")
    cd = csub.add_parser("distill", help="train a smaller student on a teacher's logits", description="distillation")
    cd.set_defaults(func=cmd_compress)
    cd.add_argument("--teacher", required=True, metavar="CKPT")
    cd.add_argument("--student", required=True, metavar="CONFIG", help="student config (TOML)")
    cd.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    cd.add_argument("--data", metavar="TOKENS_DIR", help="token shards (default: the teacher's)")
    cd.add_argument("--out", required=True, metavar="DIR")
    cd.add_argument("--alpha", type=float, default=0.5, help="weight of the KL term (1 - alpha on cross-entropy)")
    cd.add_argument("--temperature", type=float, default=1.0,
                    help="softening temperature (default 1: at 2 a randomly initialised student ended worse than "
                         "one trained without the teacher; docs/compress.md)")
    cd.add_argument("--init", choices=["teacher", "random"], default="teacher",
                    help="start the student from the teacher's embeddings and every k-th block (same width), or random")
    cd.add_argument("--overwrite", action="store_true")

    s = verb("serve", "OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, /health)", cmd_serve)
    s.add_argument("model", metavar="CKPT|ONNX_DIR|AOT_DIR")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-tokens-limit", type=int, default=1024, metavar="N", help="largest max_tokens a request may ask")
    s.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    s.add_argument("--tp", type=int, default=1, metavar="N",
                   help="tensor parallel over N processes: run under `torchrun --nproc-per-node N -m text2llm "
                        "serve ...`; rank 0 answers HTTP, every rank decodes every request over its slice")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # KEY=VALUE overrides given after the flags (argparse stops positionals at the first flag)
        target = "overrides" if hasattr(args, "overrides") else "inputs" if hasattr(args, "inputs") else None
        if target is None or any("=" not in e or e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        setattr(args, target, list(getattr(args, target) or []) + extra)
    if getattr(args, "func", None) is None:
        # `text2llm`, `text2llm tokenizer`, ... without a sub-command: show the relevant help
        parser.parse_args((argv or sys.argv[1:]) + ["--help"])
        return 2
    from text2llm.errors import UserError

    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    """The ``text2llm`` command and ``python -m text2llm``: :func:`main`, then exit. A process that
    joined a torchrun group ends with ``os._exit`` once its output is flushed, skipping interpreter
    finalization, which races the process group's worker threads (see
    ``text2llm.train.distributed.joined_process_group``). Everything the run writes is closed by then."""
    code = main()
    distributed = sys.modules.get("text2llm.train.distributed")  # not imported: no torch, no group
    if getattr(distributed, "joined_process_group", False):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)


if __name__ == "__main__":
    entry()
