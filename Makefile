# lamina-comm: build, test, benchmark. `make help` lists the targets.
VENV := .venv
PYTHON := $(VENV)/bin/python
CC ?= gcc
CFLAGS_COMMON := -std=c11 -D_GNU_SOURCE -Wall -Wextra -Werror -g -Inative/include
SANITIZE := -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
NATIVE_SRCS := $(wildcard native/src/core/*.c native/src/tcp/*.c native/src/shm/*.c native/src/channel/*.c native/src/staged/*.c)
NATIVE_HDRS := $(wildcard native/include/*.h native/src/*.h native/src/*/*.h)
BUILD := native/build
PYTEST ?= $(PYTHON) -m pytest

.PHONY: help install build native-test asan test test-rxe bench demo fuzz clean distclean

FUZZ_SECONDS ?= 60

help:
	@echo "make install   install lamina-comm (editable) with test and torch extras"
	@echo "make test      native tests (plain + ASan/UBSan) and the Python test suite"
	@echo "make asan      native tests under ASan/UBSan, then the Python suite on an ASan build"
	@echo "make test-rxe  verbs tests in a soft-RoCE qemu guest"
	@echo "make bench     loopback benchmarks side by side with iperf3 / sockperf / ucx_perftest"
	@echo "make demo      disaggregated decode on loopback (1 model node, 2 attention nodes;"
	@echo "               DEMO_ARGS='--replicas 2': 2 model nodes sharing them)"
	@echo "make fuzz      each fuzzer (tests/fuzz) for FUZZ_SECONDS (default 60) under ASan/UBSan"

# Everything a fresh machine lacks (apt when root, then .venv); done once.
$(VENV)/.installed: tools/setup.sh pyproject.toml setup.py
	tools/setup.sh
	touch $@

install: $(VENV)/.installed

# In-place rebuild of the cffi module after native changes (pip install -e built it once).
build: install
	$(PYTHON) lamina_comm/_build.py > /dev/null

$(BUILD)/test_native: tests/native/test_native.c $(NATIVE_SRCS) $(NATIVE_HDRS)
	@mkdir -p $(BUILD)
	$(CC) $(CFLAGS_COMMON) -O2 -o $@ tests/native/test_native.c $(NATIVE_SRCS) -lpthread

$(BUILD)/test_native_asan: tests/native/test_native.c $(NATIVE_SRCS) $(NATIVE_HDRS)
	@mkdir -p $(BUILD)
	$(CC) $(CFLAGS_COMMON) -O1 $(SANITIZE) -o $@ tests/native/test_native.c $(NATIVE_SRCS) -lpthread

native-test: $(BUILD)/test_native $(BUILD)/test_native_asan
	$(BUILD)/test_native
	ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 $(BUILD)/test_native_asan

# The Python suite against an ASan/UBSan build of the extension (libasan preloaded
# because python itself is not instrumented); rebuilt plain afterwards.
asan: build $(BUILD)/test_native_asan
	ASAN_OPTIONS=detect_leaks=1 $(BUILD)/test_native_asan
	LAMINA_SANITIZE=1 $(PYTHON) lamina_comm/_build.py > /dev/null
	LD_PRELOAD="$$($(CC) -print-file-name=libasan.so) $$($(CC) -print-file-name=libubsan.so)" \
	  ASAN_OPTIONS=detect_leaks=0:verify_asan_link_order=0 $(PYTEST) -q -x -m "not slow" tests/test_transport.py tests/test_shared_memory.py tests/test_channel_device.py \
	  tests/test_gpu_unavailable.py tests/test_stream_writer.py; \
	  rc=$$?; $(PYTHON) lamina_comm/_build.py > /dev/null; exit $$rc

# Multi-process tests on a shared 2-core machine can lose a race to the
# scheduler: one rerun, reported (-rR) so flakiness stays visible.
test: build native-test
	$(PYTEST) -q --reruns 1 -rR
	$(MAKE) asan

test-rxe: build
	tools/rxe-test.sh

bench: build
	PYTHON=$(PYTHON) bench/peers.sh

demo: build
	$(PYTHON) -m lamina_comm.node.demo $(DEMO_ARGS)

# Coverage-guided fuzzers (libFuzzer on the tcp frame parser, atheris on the
# Python parsers), each bounded by FUZZ_SECONDS; fails on any crash, sanitizer
# report, hang or memory limit (tools/fuzz.sh). CI: make fuzz FUZZ_SECONDS=30.
fuzz:
	FUZZ_SECONDS=$(FUZZ_SECONDS) PYTHON=$(PYTHON) tools/fuzz.sh

clean:
	rm -rf $(BUILD) build lamina_comm/_lamina*.so lamina_comm/_lamina.c lamina_comm/_lamina.o
	find native -name '*.o' -delete

distclean: clean
	rm -rf $(VENV) *.egg-info
