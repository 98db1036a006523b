# strata — the two commands a new user needs:
#   make demo   set up, build, and run the main job on the embedded default
#   make test   set up, build, and run every test suite (plain and ASan+UBSan builds)
# Everything else here is a helper for those two.

SHELL := /bin/bash
DEBS := build-essential cmake ninja-build pkg-config libjansson-dev libonig-dev libutf8proc-dev \
        libmicrohttpd-dev libcmocka-dev libcurl4-openssl-dev libssl-dev libedit-dev python3
FUZZ_DEBS := clang libclang-rt-14-dev
JOBS ?= $(shell nproc)
BUILD ?= build
BUILD_ASAN ?= build-asan
CTEST_FLAGS := --no-tests=error --output-on-failure -j$(JOBS)

.PHONY: all deps build build-asan test test-fast demo fuzz bench clean

all: build

# Installs missing Debian packages (apt-get update at most once per machine state); idempotent.
deps:
	@missing=""; for p in $(DEBS) $(EXTRA_DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	command -v npm >/dev/null 2>&1 || missing="$$missing npm"; \
	if [ -n "$$missing" ]; then \
	  echo "strata: installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

$(BUILD)/build.ninja:
	cmake -S . -B $(BUILD) -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo

$(BUILD_ASAN)/build.ninja:
	cmake -S . -B $(BUILD_ASAN) -G Ninja -DCMAKE_BUILD_TYPE=Debug -DSTRATA_SANITIZE=ON -DSTRATA_CUDA=OFF

build: deps $(BUILD)/build.ninja
	cmake --build $(BUILD) -j $(JOBS)

build-asan: deps $(BUILD_ASAN)/build.ninja
	cmake --build $(BUILD_ASAN) -j $(JOBS)

# The full suite: unit (cmocka), golden (transformers fixtures), integration; then the same
# suites again under AddressSanitizer + UndefinedBehaviorSanitizer.
test: build build-asan
	tools/fetch-test-assets.sh
	cd $(BUILD) && ctest $(CTEST_FLAGS)
	cd $(BUILD_ASAN) && ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  ctest $(CTEST_FLAGS)

# Plain build only (quick iteration).
test-fast: build
	tools/fetch-test-assets.sh
	cd $(BUILD) && ctest $(CTEST_FLAGS)

demo: build
	tools/demo.sh $(BUILD)/strata

# libFuzzer targets over the safetensors header and config parsers, bounded in time.
FUZZ_SECONDS ?= 60
fuzz:
	$(MAKE) deps EXTRA_DEBS="$(FUZZ_DEBS)"
	CC=clang cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=Debug -DSTRATA_FUZZ=ON -DSTRATA_CUDA=OFF \
	  -DCMAKE_C_FLAGS="-fsanitize=fuzzer-no-link,address,undefined"
	cmake --build build-fuzz -j $(JOBS)
	@for f in build-fuzz/fuzz_*; do \
	  echo "== $$f ($(FUZZ_SECONDS) s)"; mkdir -p build-fuzz/corpus/$$(basename $$f); \
	  $$f -max_total_time=$(FUZZ_SECONDS) build-fuzz/corpus/$$(basename $$f) tests/fuzz/seeds/$$(basename $$f) || exit 1; \
	done

clean:
	rm -rf $(BUILD) $(BUILD_ASAN) build-fuzz
