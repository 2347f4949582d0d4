"""neo's command line (`python main.py ...`, or `neo ...` when installed): the flags of GPT-Neo's
main.py, one function per mode, no logic here."""

from __future__ import annotations

import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Config name in configs/, a path to a .json model config, or GPT-NeoX "
                    "YAML files a.yml,b.yml (merged left to right; docs/convert.md).")
flags.DEFINE_string("tpu", None, "Cloud TPU name ('colab' on a Colab TPU runtime).")
flags.DEFINE_list("gpu_ids", [], "GPUs to use: integers or device:GPU:N, comma or space separated.")
flags.DEFINE_integer("steps_per_checkpoint", 5000, "Save a checkpoint every this many steps.")
flags.DEFINE_bool("auto_layout", False, "Rank layouts for the config's mesh_shape by memory and communication, print the best, exit.")
flags.DEFINE_bool("auto_layout_and_mesh_shape", False, "Rank mesh shapes and layouts, print the best, exit.")
flags.DEFINE_integer("num_devices", None, "Auto layout: plan for this many devices instead of the ones present.")
flags.DEFINE_float("device_memory_gb", None, "Auto layout: memory of one planned device, in GiB.")
flags.DEFINE_string("auto_layout_target", None, "Auto layout: plan for tpu-v3-8, tpu-v3-256, gpu-8x80g or gpu-8x40g.")
flags.DEFINE_bool("new", False, "Start over: delete model_path's checkpoints and logs first.")
flags.DEFINE_bool("predict", False, "Sample from the model and exit.")
flags.DEFINE_string("prompt", "", "Prompt file for --predict.")
flags.DEFINE_bool("interactive", False, "--predict: read prompts from stdin, one per line, until EOF or Ctrl-C.")
flags.DEFINE_bool("eval", False, "Run the config's eval_tasks (lm-eval), then validation if eval_steps > 0, and exit.")
flags.DEFINE_bool("check_dataset", False, "Inspect the training data and exit.")
flags.DEFINE_string("sacred_id", "nosacred", "Tag for prediction and eval output files.")
flags.DEFINE_bool("entmax_sampling", False, "Sample with entmax (not supported in neo).")
flags.DEFINE_bool("export", False, "Export (neo: use scripts/convert_hf.py export).")
flags.DEFINE_float("temperature", None, "--predict: sampling temperature, 0 = greedy (config key 'temperature', 0.9).")
flags.DEFINE_integer("top_k", None, "--predict: sample from the k most likely tokens, 0 = off (config 'top_k').")
flags.DEFINE_float("top_p", None, "--predict: nucleus sampling mass, 1 = off (config 'top_p').")
flags.DEFINE_integer("max_new_tokens", None, "--predict: tokens to add (config 'predict_max_steps'; default: fill n_ctx).")
flags.DEFINE_integer("num_samples", None, "--predict: samples per prompt (config 'predict_batch_size').")
flags.DEFINE_integer("seed", None, "--predict: sampling seed (config 'seed').")
flags.DEFINE_list("eval_tasks", [], "--eval: lm-eval tasks to run instead of the config's eval_tasks (comma-separated).")
flags.DEFINE_float("eval_limit", None, "--eval: documents per task (a fraction of each task if < 1).")
flags.DEFINE_string("eval_batch_size", None, "--eval: lm-eval rows per batch, or 'auto' (default).")
flags.DEFINE_integer("eval_num_fewshot", None, "--eval: few-shot examples per prompt (lm-eval's --num_fewshot).")
flags.DEFINE_string("eval_include_path", None, "--eval: a folder of extra lm-eval task YAML files.")
flags.DEFINE_multi_string("set", [], "Override a config key for this run: --set train_steps=100 (JSON values).")


def _overrides(items: list[str]) -> dict:
    import json

    from neo.errors import NeoError

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise NeoError(f"--set {item!r}: write key=value, e.g. --set train_steps=100.")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value  # a bare string such as --set lr_decay=cosine
    return out


def main(argv: list[str]) -> None:
    from absl import logging

    from neo.errors import NeoError

    logging.set_verbosity(logging.WARNING)  # JAX's backend probing is not news to a user
    try:
        _run(argv)
    except NeoError as e:
        print(f"neo: error: {e}", file=sys.stderr)
        sys.exit(2)


def _run(argv: list[str]) -> None:
    from neo.config import load_model_config
    from neo.errors import NeoError

    if len(argv) > 1:
        raise NeoError(f"unexpected arguments {argv[1:]}; flags look like --model NAME.")
    if FLAGS.interactive and not FLAGS.predict:
        raise NeoError("--interactive is a way of sampling: use it with --predict.")
    if FLAGS.interactive and FLAGS.prompt:
        raise NeoError("--interactive reads prompts from stdin; drop --prompt (or drop --interactive to "
                       "sample the prompt file).")
    cfg = load_model_config(FLAGS.model, _overrides(FLAGS.set))
    for note in cfg.notes:
        console()(f"neo: {cfg.source}: {note}")
    if FLAGS.check_dataset:
        from neo.data.check import check_dataset

        check_dataset(cfg)
        return
    if FLAGS.auto_layout or FLAGS.auto_layout_and_mesh_shape:
        from neo.auto_layout import rank, report, target_from

        target = target_from(FLAGS.num_devices, FLAGS.device_memory_gb, FLAGS.auto_layout_target)
        mesh_shape = None if FLAGS.auto_layout_and_mesh_shape else cfg.run.mesh_shape
        print(report(cfg, target, rank(cfg, target, mesh_shape), mesh_shape=mesh_shape))
        return
    if FLAGS.export:
        raise NeoError("--export (a TF SavedModel in the original) is replaced by "
                       "`python scripts/convert_hf.py export --model CFG --output HF_DIR` (a Hugging Face folder).")
    if FLAGS.entmax_sampling:
        raise NeoError("--entmax_sampling is not supported by neo; use --temperature/--top_k/--top_p.")

    from neo.devices import select_devices
    from neo.distributed import initialize
    from neo.loop import fit
    from neo.mesh import make_layout

    initialize(FLAGS.tpu)
    layout = make_layout(cfg.run.mesh_shape, cfg.run.layout, select_devices(FLAGS.gpu_ids))
    log = console()
    if FLAGS.predict:
        from neo.predict import SamplingOptions, predict, prompt_file

        opts = SamplingOptions.from_config(
            cfg, temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p,
            max_new_tokens=FLAGS.max_new_tokens, num_samples=FLAGS.num_samples, seed=FLAGS.seed)
        if FLAGS.interactive:
            from neo.interactive import interactive

            try:
                interactive(cfg, layout, opts)
            except KeyboardInterrupt:  # Ctrl-C while the checkpoint loads: nothing to clean up
                print(file=sys.stderr)
            return
        predict(cfg, layout, prompt_file(FLAGS.prompt, cfg), opts, FLAGS.sacred_id, log=log)
        return
    if FLAGS.eval:
        from neo.evaluate.harness import HarnessOptions, evaluate_checkpoint

        opts = HarnessOptions(tuple(FLAGS.eval_tasks), FLAGS.eval_limit, FLAGS.eval_batch_size,
                              FLAGS.eval_num_fewshot, FLAGS.eval_include_path)
        evaluate_checkpoint(cfg, layout, opts, FLAGS.sacred_id, log=log)
        return
    if FLAGS.new:
        from neo.checkpoint import start_over

        start_over(cfg.run.model_path, log=log)
    fit(cfg, layout, steps_per_checkpoint=FLAGS.steps_per_checkpoint, log=log, prompt_path=FLAGS.prompt)


def console():
    """Where a mode's messages and results go: the terminal of process 0 (every process of a
    multi-process run computes the same numbers; errors are raised on all of them)."""
    import jax

    return print if jax.process_index() == 0 else (lambda _message: None)


def _gather_gpu_ids(args: list[str]) -> list[str]:
    """Accept GPT-Neo's space-separated form `--gpu_ids 0 1` by joining the values."""
    out, i = [], 0
    while i < len(args):
        if args[i] == "--gpu_ids":
            j = i + 1
            while j < len(args) and not args[j].startswith("-"):
                j += 1
            out.append("--gpu_ids=" + ",".join(args[i + 1:j]))
            i = j
        else:
            out.append(args[i])
            i += 1
    return out


def cli() -> None:
    from neo.host_memory import restart_with_huge_pages

    restart_with_huge_pages()  # once, before anything heavy is imported (neo/host_memory.py)
    app.run(main, argv=_gather_gpu_ids(sys.argv))
