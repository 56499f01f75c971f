# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo lint setup clean default-rec default-grec mutate

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip >/dev/null

# torch first, from the pinned version, so no later dependency can pull a different build.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install "torch==2.13.0"
	$(BIN)/pip install -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/simvg demo

# The embedded REC default's recipe (docs/results.md): data (the starter folder only for its tokenizer, the word ids of
# every SynthRef recipe), then pre-training of the encoder on linked SynthRef captions (2000 steps, 54-72 min), then
# SimVG on the easy level from that encoder (5400 steps, 76 min); one core each, the other core busy.
# Run it again after an interruption: each stage resumes from its last.pth. Ship it:
# simvg export weights --checkpoint runs/synthref_rec/last.pth --out simvg/assets/default --half
default-rec: $(STAMP)
	test -f data/synthref_rec_starter/instances.json || $(BIN)/simvg data synth --out data/synthref_rec_starter \
		--task rec --num-images 4000 --image-size 128 --seed 2 --max-objects 2 --background plain
	test -f data/synthref_rec_easy/instances.json || $(BIN)/simvg data synth --out data/synthref_rec_easy \
		--task rec --num-images 4000 --image-size 128 --seed 0 --max-objects 4 --background plain
	$(BIN)/simvg pretrain configs/pretrain/synthref_align.yaml $$(test -f runs/pretrain_synthref/last.pth && echo --resume)
	$(BIN)/simvg train configs/synthref_rec.yaml $$(test -f runs/synthref_rec/last.pth && echo --resume)

# The embedded GREC default's recipe: from the REC default's run (make default-rec first), two stages on the easy
# GREC level (66 min on one core with the other core busy; 50 min with train.threads=2 on idle cores). Ship it
# (then set `branch: decoder` in its model.yaml, as shipped; export picks the token branch of a model that trained one):
# simvg export weights --checkpoint runs/synthref_grec/last.pth --out simvg/assets/default_grec --half
default-grec: $(STAMP)
	test -f runs/synthref_rec/last.pth || $(MAKE) default-rec
	test -f data/synthref_grec_easy/instances.json || $(BIN)/simvg data synth --out data/synthref_grec_easy \
		--task grec --num-images 4000 --image-size 128 --seed 1 --max-objects 4 --background plain
	$(BIN)/simvg train configs/synthref_grec_start.yaml
	$(BIN)/simvg train configs/synthref_grec.yaml

# Mutation testing of the core formula modules ([tool.mutmut] in pyproject.toml; docs/mutation.md has the last run).
# Not part of `make test`: a whole run took 34 min on a shared 2-core VM before tests/test_hardening.py joined the
# selection (docs/mutation.md has each run's time). Results and the mutated copy live in mutants/;
# `$(BIN)/mutmut show NAME` prints one mutant, `$(BIN)/mutmut browse` browses them. MUTATE_JOBS: parallel mutants.
MUTATE_STAMP := $(VENV)/.mutate-installed
MUTATE_JOBS ?= 1

$(MUTATE_STAMP): $(STAMP) pyproject.toml
	$(BIN)/pip install -e ".[test,mutate]"
	touch $(MUTATE_STAMP)

mutate: $(MUTATE_STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/mutmut run --max-children $(MUTATE_JOBS)
	$(BIN)/mutmut results

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
