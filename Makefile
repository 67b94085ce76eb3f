# dkimgw: `make test` runs everything CI runs, on a fresh Debian 12 machine
# as root (it installs what the tests need); `make demo` runs the gateway
# end to end; `make bench` measures it.

# The Go toolchain's usual home, for shells whose PATH lacks it.
export PATH := $(PATH):/usr/local/go/bin

GO      ?= go
BIN     := bin/dkimgw
GOFLAGS ?=

.PHONY: all build install deps test test-short test-faults test-hostile fuzz bench demo clean

all: build

build:
	$(GO) build $(GOFLAGS) -o $(BIN) ./cmd/dkimgw

# Puts bin/dkimgw on PATH: $(DESTDIR)$(PREFIX)/bin/dkimgw (DESTDIR for
# packagers). It builds first, so an installed binary is never stale.
PREFIX  ?= /usr/local
DESTDIR ?=
install: build
	install -d $(DESTDIR)$(PREFIX)/bin
	install -m 0755 $(BIN) $(DESTDIR)$(PREFIX)/bin/dkimgw

# Debian packages: SoftHSM, the independent verifiers, Postfix, BIND, ...
deps:
	@scripts/install-deps.sh

# The patched go-smtp (third_party/go-smtp/PATCHES.md) is a module of its
# own, tested last; its TestServerAcceptErrorHandling is flaky in v0.25.1
# itself (it closes the server before the listener's error arrives), so it
# is skipped. The patched miekg/pkcs11 (third_party/pkcs11/PATCHES.md) is
# tested in a copy: its tests sign with the SoftHSM token store kept beside
# them, and write to it.
test: deps
	$(GO) mod download
	$(GO) vet ./...
	GO=$(GO) scripts/go-test.sh -race -timeout 15m ./...
	cd third_party/go-smtp && $(GO) test -race -count=1 -skip '^TestServerAcceptErrorHandling$$' ./...
	tmp=$$(mktemp -d) && cp -r third_party/pkcs11 "$$tmp" && cd "$$tmp/pkcs11" && $(GO) test -race -count=1 ./...; rc=$$?; rm -rf "$$tmp"; exit $$rc

# The unit tests alone: no token, no verifiers, no servers needed (tests
# that need one skip when CI is not true).
test-short:
	$(GO) test -short ./...

# The fault suite's long form: every scenario with 2,000 messages or more
# over 20+ sessions through the real gateway (`make test` runs the short
# form). It writes the table of results to docs/reliability.md.
test-faults: deps
	$(GO) mod download
	DKIMGW_FAULTS=long DKIMGW_FAULTS_REPORT=$(CURDIR)/docs/reliability.md \
	DKIMGW_FAULTS_COMMAND="make test-faults" CI=true \
	  $(GO) test -count=1 -timeout 90m -run '^TestFaults$$' -v ./faults

# Runs each fuzz target for FUZZTIME (their seed corpora run in `make test`).
FUZZTIME ?= 30s
fuzz:
	@for pkg in $$($(GO) list ./...); do \
	  for f in $$($(GO) test -list '^Fuzz' $$pkg | grep '^Fuzz'); do \
	    echo "== $$pkg $$f"; $(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) $$pkg || exit 1; \
	  done; \
	done

# `make test-faults` also runs, before the fault suite's recipe above,
# every fuzz target for FUZZTIME and the hostile-input tests with
# DKIMGW_HOSTILE_FULL=1, which sends a whole 1 GB DATA stream where
# `make test` sends 16 MiB. They run without the race detector here (its
# cost per byte read makes a gigabyte take minutes); `make test` runs
# them with it. One alone:
#   DKIMGW_HOSTILE_FULL=1 go test -run TestHugeDataCutAtSizeLimit ./smtpproxy
test-faults: fuzz test-hostile

test-hostile:
	DKIMGW_HOSTILE_FULL=1 CI=true $(GO) test -count=1 -timeout 30m \
	  -run 'TestSmuggled|TestHugeData|TestHeaderBombs|TestSlowLoris|TestNotAnOpenRelay|TestNoSignatureForAnotherDomain|TestAuthBruteForce|TestSpool' \
	  ./smtpproxy ./signer
	CI=true $(GO) test -race -count=1 -timeout 30m -run 'TestSecretsNeverShown' ./cmd/dkimgw

# The soak (not in CI): the gateway under a steady load for SOAK_DURATION
# (10m; e.g. SOAK_DURATION=1m for a trial) with a key rotation every
# minute and a SIGHUP every 30 s; its goroutines, file descriptors, memory
# and token sessions must stay flat. It writes its section of
# docs/reliability.md (the fault table stays as it is).
SOAK_DURATION ?= 10m
SOAK_TIMEOUT  ?= 60m
.PHONY: soak
soak: deps
	$(GO) mod download
	DKIMGW_SOAK=1 SOAK_DURATION=$(SOAK_DURATION) DKIMGW_SOAK_REPORT=$(CURDIR)/docs/reliability.md \
	DKIMGW_SOAK_COMMAND="make soak" CI=true \
	  $(GO) test -count=1 -timeout $(SOAK_TIMEOUT) -run '^TestSoak$$' -v ./faults

bench: deps build
	@scripts/bench.sh

demo: deps build
	@scripts/demo.sh

clean:
	rm -rf bin
