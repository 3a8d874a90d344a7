# Every target that runs project code first makes sure .venv exists and holds the project.
# `make help` lists the targets.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
IMAGES ?= ../shared/bench-images
SHARDS ?= demo_out/shards/imagenet
CKPT ?= runs/image_kd
TEXT_SHARDS ?= shards/owt-bert
TEXT_CKPT ?= runs/text_kd
TEACHER ?= bert-base-uncased
MM_SHARDS ?= shards/coco-karpathy,shards/cc3m,shards/cc12m
MM_CKPT ?= runs/multimodal
DEMO_OUT ?= demo_out

.DEFAULT_GOAL := help
.PHONY: help venv lint test test-fast demo bench-shardify bench-scale bench-stage bench-tokenize bench-loader bench-download bench-train train-image train-text train-multimodal clean gpu-check-prep gpu-check

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

venv: $(VENV)/.installed ## Create .venv and install the project with test extras

lint: $(VENV)/.installed ## ruff over the tree (rules in pyproject.toml [tool.ruff]); `ruff check --fix .` fixes most
	$(VENV)/bin/ruff check .

test: $(VENV)/.installed ## Run the whole test suite, offline
	$(OFFLINE) $(PY) -m pytest -q tests

test-fast: $(VENV)/.installed ## Run the tests not marked slow
	$(OFFLINE) $(PY) -m pytest -q -m "not slow" tests

demo: $(VENV)/.installed ## Build the embedded demo dataset and run the whole pipeline on it
	$(OFFLINE) PY=$(PY) DEMO_OUT=$(DEMO_OUT) bash scripts/demo.sh

bench-shardify: $(VENV)/.installed ## Time shardify against tar and a bare ShardWriter loop (IMAGES=dir)
	$(OFFLINE) $(PY) bench/bench_shardify.py --images $(IMAGES)

bench-scale: $(VENV)/.installed ## shardify's peak memory and planning time at 2M / 20M URL rows and 1.28M files (generated in tmp; ROWS=, FILES= for a quick run)
	$(OFFLINE) $(PY) bench/bench_scale.py --rows $(or $(ROWS),2000000,20000000) --files $(or $(FILES),1280000)

bench-stage: $(VENV)/.installed ## Hub bytes of a 4-task job on the archives layout: shared staging against every task streaming the split (IMAGES=dir)
	$(OFFLINE) $(PY) bench/bench_stage.py --images $(IMAGES)

bench-tokenize: $(VENV)/.installed ## Tokenise-and-pack throughput per core against datasets.map
	$(OFFLINE) $(PY) bench/bench_tokenize.py --docs 2000 --repeats 7

bench-loader: $(VENV)/.installed ## CPU loader path against DALI's CPU pipeline (own venv), the classic torchvision pipeline and a bare decode (IMAGES=dir)
	$(OFFLINE) $(PY) bench/bench_loader.py --images $(IMAGES)

bench-download: $(VENV)/.installed ## URL-list download against img2dataset from a local 127.0.0.1 server (IMAGES=dir)
	$(OFFLINE) $(PY) bench/bench_download.py --images $(IMAGES)

clean: ## Remove demo and benchmark outputs (keeps .venv)
	rm -rf $(DEMO_OUT) bench_out

train-image: $(VENV)/.installed ## Distil Data2Vec2 ViT-B/16 into 6 blocks (SHARDS=shards dir, CKPT=run dir; resumes)
	$(OFFLINE) $(VENV)/bin/trainer train configs/image_kd.yaml "data.manifests=[$(SHARDS)]" "out_dir=$(CKPT)" resume=auto $(TRAIN_ARGS)

# not offline: a hub id teacher is fetched once into the Hugging Face cache (TEACHER=DIR works offline)
train-text: $(VENV)/.installed ## Distil BERT into 6 layers on pre-tokenised OpenWebText (TEXT_SHARDS=dir, TEXT_CKPT=run dir, TEACHER=id or dir; resumes)
	$(VENV)/bin/trainer train configs/text_kd.yaml "data.manifests=[$(TEXT_SHARDS)]" "teacher.path=$(TEACHER)" "out_dir=$(TEXT_CKPT)" resume=auto $(TRAIN_ARGS)

train-multimodal: $(VENV)/.installed ## S-SMKE: Data2Vec2 + BERT towers, shared block, BEiTv2 teacher (MM_SHARDS=a,b,c MM_CKPT=run dir; resumes)
	$(OFFLINE) $(VENV)/bin/trainer train configs/multimodal.yaml "data.manifests=[$(MM_SHARDS)]" "out_dir=$(MM_CKPT)" resume=auto $(TRAIN_ARGS)

bench-train: $(VENV)/.installed ## Time the demo training config on CPU through the streaming loader (SHARDS=dir)
	$(OFFLINE) $(PY) bench/bench_train.py --shards $(SHARDS)

gpu-check-prep: $(VENV)/.installed ## Put simplejpeg wheels and the bench photos into gpu_check_data/ for a GPU machine (IMAGES=dir)
	PY=$(PY) IMAGES=$(IMAGES) bash scripts/gpu_check_prep.sh

gpu-check: ## The GPU check on this machine (needs CUDA; see docs/benchmarks.md)
	bash scripts/gpu_check.sh
