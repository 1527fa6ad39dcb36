# Two commands do everything on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test install warm release-check clean secret-scan

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) -m appliance.cli serve --dev

warm: $(STAMP)
	$(PY) -m appliance.cli warm --dev

# Tests build guest-made trees deeper than Python's recursion limit; pytest's
# own clean-up of old temp dirs would crash on them, so the suite gets a temp
# root of its own that rm (iterative) empties before each run.
TEST_TMP ?= /tmp/cell-tests-$(shell id -u)

test: $(STAMP)
	rm -rf $(TEST_TMP)
	$(PY) -m pytest --basetemp=$(TEST_TMP)

secret-scan:
	@! git grep -nE "sk_live_[a-zA-Z0-9]{8,}|e2b_[a-f0-9]{40}|password\s*=\s*\"" -- .

release-check: $(STAMP) secret-scan
	$(PY) run_test.py
	$(PY) tests/stress_test.py --quick
	$(PY) tests/red_team.py
	$(PY) tests/benchmark_e2b.py

clean:
	rm -rf $(VENV) .synapse .pytest_cache
