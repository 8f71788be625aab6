# kv-lifecycle developer entry points.  README's two commands: `make demo` and `make test`.
PYTHON ?= python3
JOBS ?= 2
# Evaluated where used (=, not :=): `make test` on a fresh machine reads this file before its setup step
# installs pybind11, and an empty value then broke the reconfigure of build/release.
PYBIND11_DIR = $(shell $(PYTHON) -m pybind11 --cmakedir 2>/dev/null)
CMAKE_FLAGS = -G Ninja -DPython_EXECUTABLE=$(shell command -v $(PYTHON)) -Dpybind11_DIR=$(PYBIND11_DIR)

.PHONY: setup build test test-cpp test-sanitize test-py demo bench clean

setup:
	bash scripts/setup.sh

# Release extension next to the sources (lifecycle/_core*.so); fails if the table is invalid.
build:
	cmake -S . -B build/release $(CMAKE_FLAGS) -DCMAKE_BUILD_TYPE=Release -DLIFECYCLE_WERROR=ON -DLIFECYCLE_TESTS=ON >/dev/null
	cmake --build build/release -j$(JOBS)

test-cpp: build
	ctest --test-dir build/release --output-on-failure

# C++ tests under AddressSanitizer+UBSan, and the concurrency test under ThreadSanitizer.
test-sanitize:
	cmake -S . -B build/asan $(CMAKE_FLAGS) -DCMAKE_BUILD_TYPE=Debug -DLIFECYCLE_PYTHON=OFF -DLIFECYCLE_TESTS=ON -DLIFECYCLE_WERROR=ON -DLIFECYCLE_SANITIZE=address,undefined >/dev/null
	cmake --build build/asan -j$(JOBS)
	UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 ASAN_OPTIONS=detect_leaks=1 ctest --test-dir build/asan --output-on-failure
	cmake -S . -B build/tsan $(CMAKE_FLAGS) -DCMAKE_BUILD_TYPE=Debug -DLIFECYCLE_PYTHON=OFF -DLIFECYCLE_TESTS=ON -DLIFECYCLE_WERROR=ON -DLIFECYCLE_SANITIZE=thread >/dev/null
	cmake --build build/tsan -j$(JOBS)
	TSAN_OPTIONS=halt_on_error=1 ctest --test-dir build/tsan --output-on-failure -R "concurrency|clock|transport"

test-py:
	$(PYTHON) -m pytest -q

# Sets up a fresh machine, then runs every test: C++ (plain, ASan+UBSan, TSan) and Python (incl. MPI).
test: setup test-cpp test-sanitize test-py

# The main job: 5,000 requests, half cancelled at random points, seeded faults, verified end to end.
demo: setup
	$(PYTHON) -m lifecycle demo --requests 5000 --cancel-fraction 0.5 --faults delay,error,disconnect,drop-notif --seed 7

bench: setup
	$(PYTHON) -m lifecycle bench

clean:
	rm -rf build lifecycle/_core*.so
