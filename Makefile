# edgetl: `make demo` sets everything up and runs the HAR recipe; `make test` runs the tests.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml device_runners/pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
RECIPE  ?= models/har/recipe.toml
OUT     ?= runs/har
export PIP_DISABLE_PIP_VERSION_CHECK = 1

.PHONY: bench-trainable install venv-ort venv-fleet js-install web web-screenshot data-vision data-text demo demo-vision demo-text bench bench-web methods fleet ddp coverage test test-quick test-slow test-pi style lint format docs clean help

help:
	@echo "make demo       create $(VENV), install (pinned, CPU torch) and run $(RECIPE) -> $(OUT)"
	@echo "make demo-vision  Fashion-MNIST -> digits on cameras (EfficientNet-Lite0 vs student)"
	@echo "make demo-text  WordNet glosses -> fortune topics on devices (MiniLM vs student)"
	@echo "make bench      latency/throughput/adaptation/memory/accuracy of every bundle vs PyTorch,"
	@echo "                ORT training and the machine's peak -> runs/bench/{bench.md,tradeoff.png};"
	@echo "                then make bench-web and make bench-trainable"
	@echo "make bench-web  the HAR bundles' self-test, adaptation and load time in the Python runner,"
	@echo "                onnxruntime-node, onnxruntime-web (WASM), LiteRT.js and headless Chromium"
	@echo "                -> runs/bench/runtimes.{md,json,png}"
	@echo "make bench-trainable  --trainable head/bias/last:1 of the HAR student vs the PyTorch"
	@echo "                eager loop (time, memory, graph size) -> runs/har-tr/bench.json"
	@echo "make methods    transfer methods vs source-only (HAR cross-user, Fashion-MNIST -> digits)"
	@echo "make fleet      Flower fleet: 100 simulated devices improve the shipped head (FedAvg)"
	@echo "                -> runs/fleet/{fleet.md,fleet.png,bundle-v2}"
	@echo "make ddp        teacher pretraining on 2 processes (torchrun) vs 1 -> weight difference"
	@echo "make coverage   architectures from outside edgetl (transformers, user modules) x"
	@echo "                {onnx,tflite} x {fp32,int8}: export, parity, runner -> docs/coverage.md"
	@echo "make js-install the TypeScript device runner (device_runners/js): npm ci + tsc, and"
	@echo "                the web page (device_runners/web/dist)"
	@echo "make web        serve the web page on http://127.0.0.1:$(WEB_PORT)/ (personalise in the"
	@echo "                browser; COOP/COEP headers for WASM threads)"
	@echo "make web-screenshot  docs/web.png, from the headless-Chromium test (tests/test_web.py)"
	@echo "make test       default tier: unit + integration, everything but slow (no GPU, no"
	@echo "                network; 16-20 min on 2 cores); lists skipped tests and why at the end"
	@echo "make test-quick unit tier only (pytest -m unit, ~1 min): no dataset, no runner"
	@echo "                subprocess, no .venv-ort/.venv-fleet"
	@echo "make test-slow  long tests on the real dataset (the whole demo recipe)"
	@echo "make test-pi    device runners on emulated Linux aarch64 (Raspberry Pi) vs x86_64 (root)"
	@echo "make style      ruff lint (pyflakes, pycodestyle, pydocstyle, bugbear, isort)"
	@echo "make docs       docs/recipe.md (every recipe key) from the config dataclasses"

$(STAMP): pyproject.toml device_runners/pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first, pinned: an unpinned torch pulls several GB of CUDA wheels.
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	# the device package (edgetl-edgerun: the bundle schema and runtime backends) before edgetl
	$(BIN)/pip install -q -c constraints.txt -e device_runners
	$(BIN)/pip install -q -c constraints.txt -e ".[train,onnx,tflite,data,vision,text,sign,dev]"
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

# ONNX Runtime's (deprecated) training API, for `--trainer ort-training` bundles: its package
# installs the same import name as onnxruntime, so it gets an environment of its own.
ORT_VENV ?= .venv-ort
$(ORT_VENV)/.installed: constraints.txt
	test -x $(ORT_VENV)/bin/python || $(PY) -m venv $(ORT_VENV)
	$(ORT_VENV)/bin/pip install -q -c constraints.txt numpy onnx==1.17.0 \
		onnxruntime-training-cpu==1.19.2
	touch $@

venv-ort: $(ORT_VENV)/.installed

# Flower (edgetl fleet): flwr pins typer < 0.21 (edgetl: 0.29), so the fleet simulation and the
# device clients get an environment of their own: flwr + numpy + onnxruntime, no torch.
FLEET_VENV ?= .venv-fleet
$(FLEET_VENV)/.installed: device_runners/requirements-fleet.txt
	test -x $(FLEET_VENV)/bin/python || $(PY) -m venv $(FLEET_VENV)
	$(FLEET_VENV)/bin/pip install -q -r device_runners/requirements-fleet.txt
	touch $@

venv-fleet: $(FLEET_VENV)/.installed

# The TypeScript device runner (device_runners/js): npm ci from the lock file, then tsc --strict.
# ONNXRUNTIME_NODE_INSTALL=skip: onnxruntime-node's postinstall would download CUDA binaries;
# its CPU build ships in the package. Without node/npm its tests skip, saying so.
JS_DIR := device_runners/js
JS_STAMP := $(JS_DIR)/node_modules/.edgetl-lock-sha256
js-install:
	@if ! command -v npm >/dev/null 2>&1 || ! command -v node >/dev/null 2>&1; then \
	  echo "skipping js-install: node/npm not found (tests/test_js_runner.py will skip)"; \
	else \
	  want=$$(sha256sum $(JS_DIR)/package-lock.json | cut -d' ' -f1); \
	  if [ "$$(cat $(JS_STAMP) 2>/dev/null)" != "$$want" ]; then \
	    (cd $(JS_DIR) && ONNXRUNTIME_NODE_INSTALL=skip npm ci --no-audit --no-fund) && \
	    echo "$$want" > $(JS_STAMP); \
	  fi && node $(JS_DIR)/node_modules/typescript/bin/tsc -p $(JS_DIR) && \
	  node $(JS_DIR)/node_modules/typescript/bin/tsc -p $(JS_DIR)/tsconfig.examples.json && \
	  node device_runners/web/build.mjs; \
	fi

# The web page (device_runners/web): personalise a bundle in the browser, served on 127.0.0.1
# only, with the cross-origin isolation headers multi-threaded WASM needs.
WEB_PORT ?= 8000
web: js-install
	node device_runners/web/serve.mjs --port $(WEB_PORT)

web-screenshot: install js-install
	EDGETL_WEB_SCREENSHOT=$(abspath docs/web.png) $(BIN)/python -m pytest -q -rs \
		tests/test_web.py -k personalises
	@# 64 colours: ~75 KB instead of ~240 KB
	$(BIN)/python -c "from PIL import Image; Image.open('docs/web.png').convert('RGB')"\
".quantize(64).save('docs/web.png', optimize=True)"

# Fashion-MNIST ships as a Debian package (idx files under /usr/share/datasets).
data-vision:
	@dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || { \
	  echo "installing the Debian package dataset-fashion-mnist (Fashion-MNIST)"; \
	  { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; } >/dev/null || \
	  { echo "error: could not install dataset-fashion-mnist; as root run: apt-get update &&" \
	         "apt-get install dataset-fashion-mnist"; exit 1; }; }

# WordNet and the fortunes topic files ship as Debian packages.
TEXT_DEBS := wordnet-base fortunes
data-text:
	@missing=$$(for p in $(TEXT_DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing the Debian packages $$missing (WordNet glosses, fortunes topics)"; \
	  { apt-get update -qq && apt-get install -y -qq $$missing; } >/dev/null || \
	  { echo "error: could not install $$missing; as root run: apt-get update &&" \
	         "apt-get install $$missing"; exit 1; }; fi

demo: install
	$(BIN)/edgetl run $(RECIPE) --out $(OUT)

demo-vision: install data-vision
	$(BIN)/edgetl run models/vision/recipe.toml --out runs/vision

demo-text: install data-text
	$(BIN)/edgetl run models/text/recipe.toml --out runs/text

# Both scenarios in one bench run (ratios within one run: the machine is noisy); the runs are
# made first when missing (make demo / make demo-vision write the same folders).
BENCH_RUNS ?= $(OUT) runs/vision
bench: install venv-ort data-vision
	test -f $(OUT)/summary.json || $(BIN)/edgetl run $(RECIPE) --out $(OUT)
	test -f runs/vision/summary.json || $(BIN)/edgetl run models/vision/recipe.toml --out runs/vision
	EDGETL_ORT_TRAINING_PYTHON=$(abspath $(ORT_VENV))/bin/python \
		$(BIN)/edgetl bench $(BENCH_RUNS) --out runs/bench
	$(MAKE) --no-print-directory bench-web
	$(MAKE) --no-print-directory bench-trainable

# --trainable SPECs (head, bias, last:1) of the HAR student against the PyTorch eager loop
# training the same subset (docs/trainable.md): adaptation / inference, loop / runner, peak RSS,
# train-graph size, rounds interleaved in fresh processes. The bundles are exported again when
# the student is newer than them (after a new make demo); delete runs/har-tr after an exporter change.
TRAINABLE_ROUNDS ?= 5
bench-trainable: install
	test -f $(OUT)/summary.json || $(BIN)/edgetl run $(RECIPE) --out $(OUT)
	for spec in head bias last:1; do \
		d=runs/har-tr/onnx-fp32-$$(echo $$spec | tr -d :); \
		test $$d/manifest.json -nt $(OUT)/student.pt -a -z "$$(find edgetl device_runners/edgerun \
			-name '*.py' -newer $$d/manifest.json)" || $(BIN)/edgetl export $(OUT)/student.pt --recipe $(RECIPE) \
			--target onnx --precision fp32 --trainable $$spec --out $$d || exit 1; \
	done
	$(BIN)/python -m tools.trainable_bench --bundle head=runs/har-tr/onnx-fp32-head \
		--bundle bias=runs/har-tr/onnx-fp32-bias --bundle last:1=runs/har-tr/onnx-fp32-last1 \
		--run $(OUT) --rounds $(TRAINABLE_ROUNDS) --epochs 20 --json runs/har-tr/bench.json

# The device runners' runtimes side by side on the HAR bundles (docs/benchmarks.md, "Runtimes"):
# the Python runner, the TypeScript runner on onnxruntime-node, onnxruntime-web's WASM build
# (Node; headless Chromium at 1 and 2 threads) and LiteRT.js (Node, Chromium), and the web page's
# load, in fresh processes, rounds interleaved. Runtimes this machine lacks (Chromium, node) are
# skipped, saying why.
RUNTIME_ROUNDS ?= 5
bench-web: install js-install
	test -f $(OUT)/summary.json || $(BIN)/edgetl run $(RECIPE) --out $(OUT)
	for b in onnx-fp32 onnx-int8 tflite-fp32 tflite-int8; do \
		d=$(OUT)/bundles/$$b; \
		test $$d/manifest.json -nt $(OUT)/student.pt -a -z "$$(find edgetl device_runners/edgerun \
			-name '*.py' -newer $$d/manifest.json)" || $(BIN)/edgetl export $(OUT)/student.pt \
			--recipe $(RECIPE) --target $${b%-*} --precision $${b#*-} --out $$d || exit 1; \
	done
	$(BIN)/python -m tools.runtime_bench $(OUT) --rounds $(RUNTIME_ROUNDS) --out runs/bench

# Transfer methods (L2-SP, EWC, AdaBN, DANN, MMD, CORAL) against the source-only model on
# both scenarios -> runs/methods/methods.{json,md} (the README's "Transfer methods" table).
methods: install data-vision
	$(BIN)/edgetl methods models/har/recipe.toml models/vision/recipe.toml --out runs/methods

# Federated head training over 100 simulated devices (held-out HAPT users) -> runs/fleet
# (the README's "Scaling out" numbers); the HAR run is made first when missing.
fleet: install venv-fleet
	test -f $(OUT)/bundles/onnx-fp32/manifest.json || $(BIN)/edgetl run $(RECIPE) --out $(OUT)
	EDGETL_FLEET_PYTHON=$(abspath $(FLEET_VENV))/bin/python \
		$(BIN)/edgetl fleet $(OUT)/bundles/onnx-fp32 --recipe $(RECIPE) --out runs/fleet

# Server training on 2 processes (torchrun, DDP over gloo on CPU) vs 1 process, same seed and
# global batch: the teacher's max weight difference (the README's "Scaling out" numbers), and
# the same difference between two 1-process runs that differ only in their thread count.
ddp: install
	$(BIN)/edgetl pretrain $(RECIPE) --out runs/ddp/p1 -q
	$(BIN)/torchrun --standalone --nproc-per-node 2 -m edgetl.cli pretrain $(RECIPE) \
		--out runs/ddp/p2 -q
	$(BIN)/python -m edgetl.distributed runs/ddp/p1/teacher.pt runs/ddp/p2/teacher.pt
	# control: the same single process with 1 thread instead of 2 (only float sums reorder)
	$(BIN)/edgetl pretrain $(RECIPE) --out runs/ddp/p1-1thread -q --threads 1
	$(BIN)/python -m edgetl.distributed runs/ddp/p1/teacher.pt runs/ddp/p1-1thread/teacher.pt

# Model coverage: transformers architectures (small random configs) and user-written modules,
# each through every exporter x precision and the device runner, one process per cell ->
# docs/coverage.{md,json} (committed), plus the --trainable cells (bias, last:1, all x onnx,
# tflite, fp32: export, self-test, 20-step parity vs torch.optim). COVERAGE_ARGS="--only vit
# --jobs 2" narrows or widens it; "--trainable-specs none" skips the trainable cells,
# "--skip-head" runs only them.
COVERAGE_ARGS ?=
coverage: install
	nice -n 5 $(BIN)/python -m tools.coverage --out docs/coverage.md $(COVERAGE_ARGS)

# Tiers (pyproject.toml markers, tests/conftest.py): `unit` or `integration` for every test;
# `data`, `env_ort`, `env_fleet`, `slow` for what it needs. -rs: skipped tests and why, at the end.
test: install venv-ort venv-fleet js-install
	EDGETL_ORT_TRAINING_PYTHON=$(abspath $(ORT_VENV))/bin/python \
		EDGETL_FLEET_PYTHON=$(abspath $(FLEET_VENV))/bin/python $(BIN)/python -m pytest -q -rs --durations=25

test-quick: install
	$(BIN)/python -m pytest -q -rs -m unit

test-slow: install venv-ort
	EDGETL_ORT_TRAINING_PYTHON=$(abspath $(ORT_VENV))/bin/python $(BIN)/python -m pytest -q -rs -m slow

# Raspberry Pi: the device runners on an arm64 Debian bookworm chroot under qemu-user (root;
# first build ~6 min, then a cached rootfs in $EDGETL_PI_CACHE), compared with this x86_64 run.
# PI_BUNDLES=runs/har/bundles tests existing bundles instead of fresh small ones.
PI_OUT ?= runs/pi
test-pi: install
	nice -n 10 $(BIN)/python -m tools.pi --out $(PI_OUT) $(if $(PI_BUNDLES),--bundles $(PI_BUNDLES))

style lint: install
	$(BIN)/ruff check edgetl device_runners tests tools

format: install
	$(BIN)/ruff check --fix edgetl device_runners tests tools

# The recipe reference is generated from edgetl/config.py (tests/test_recipe_doc.py checks it).
docs: install
	$(BIN)/python -m edgetl.config --markdown > docs/recipe.md
	$(BIN)/python -m edgerun.manifest > docs/bundle-format.md

clean:
	rm -rf runs .pytest_cache .ruff_cache
