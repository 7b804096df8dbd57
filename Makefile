# blockd: build, test and fuzz.
GO ?= go
PEERS = qemu-utils qemu-system-common cryptsetup-bin libnbd-bin python3-libnbd fio nbdkit xz-utils openssl
FUZZTIME ?= 5s

.PHONY: all build test vet race fuzz peers

all: build

build:
	$(GO) build -o blockd ./cmd/blockd

vet:
	$(GO) vet ./...
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { echo "gofmt needed:"; gofmt -l $$(git ls-files '*.go'); exit 1; }

# The whole suite, with the race detector, plus a short run of every fuzz
# target. Peer-tool tests skip when a tool is missing, except with CI=true.
# tests/e2e drives blockd processes: the daemon is built with -race there
# instead of the test client (go-qemu's monitor shares its read buffer
# across goroutines, which the detector flags in the client).
test: vet
	$(GO) test -race -count=1 -timeout 20m $$($(GO) list ./... | grep -v /tests/e2e)
	BLOCKD_E2E_RACE=1 $(GO) test -count=1 -timeout 10m ./tests/e2e
	$(MAKE) fuzz

# Each fuzz target for FUZZTIME.
fuzz:
	@set -e; for pkg in $$($(GO) list ./...); do \
	  for t in $$($(GO) test -list '^Fuzz' $$pkg 2>/dev/null | grep '^Fuzz'); do \
	    echo "fuzz $$pkg $$t"; \
	    $(GO) test -run '^$$' -fuzz "^$$t$$" -fuzztime $(FUZZTIME) -fuzzminimizetime 1s $$pkg > /tmp/fuzz.$$t.log 2>&1 || { cat /tmp/fuzz.$$t.log; exit 1; }; \
	  done; \
	done

# Install the peer tools the end-to-end tests use (Debian, as root).
peers:
	apt-get update -q
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(PEERS)
