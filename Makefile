# blockd: build, test and fuzz.
GO ?= go
PEERS = qemu-utils qemu-system-common cryptsetup-bin libnbd-bin python3-libnbd fio nbdkit xz-utils openssl gnutls-bin
FUZZTIME ?= 5s

.PHONY: all build test vet race fuzz peers

all: build

build:
	$(GO) build -o blockd ./cmd/blockd

vet:
	$(GO) vet ./...
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { echo "gofmt needed:"; gofmt -l $$(git ls-files '*.go'); exit 1; }

# Packages whose tests take longest under -race, slowest first. go test
# starts packages in the order given (GOMAXPROCS at a time), so these start
# first and the many short packages fill the gaps, instead of a long one
# running alone at the end. A package missing from the module is skipped.
SLOWTESTS = cmd/blockd-img cmd/blockd-img/blockdimg drivers/qcow2 drivers/luks/luksfmt tests/torture \
	tests/faults tests/soak internal/blockcrypto qmp nbd drivers/luks tests/security drivers/file

# The whole suite, with the race detector, plus a short run of every fuzz
# target. Peer-tool tests skip when a tool is missing, except with CI=true.
# tests/e2e drives blockd processes: the daemon is built with -race there
# instead of the test client (go-qemu's monitor shares its read buffer
# across goroutines, which the detector flags in the client). vet has run
# in full before, so go test does not repeat its subset (-vet=off).
test: vet
	@set -e; mod=$$($(GO) list -m); all=$$($(GO) list ./... | grep -v /tests/e2e); \
	first=$$(for p in $(SLOWTESTS); do echo "$$all" | grep -x "$$mod/$$p" || true; done); \
	rest=$$(echo "$$all" | grep -vxF "$$first"); \
	echo $(GO) test -race -count=1 -vet=off -timeout 20m $$first $$rest; \
	$(GO) test -race -count=1 -vet=off -timeout 20m $$first $$rest
	BLOCKD_E2E_RACE=1 $(GO) test -count=1 -vet=off -timeout 10m ./tests/e2e
	@# The allocation tests skip under -race (sync.Pool drops items on purpose
	@# there), so they run once more without it.
	$(GO) test -count=1 -vet=off -run 'NoAllocations$$' \
		$$(grep -rl --include='*_test.go' '^func Test[A-Za-z]*NoAllocations(' . | xargs -n1 dirname | sort -u)
	$(MAKE) fuzz

# Each fuzz target for FUZZTIME, FUZZJOBS at a time (.ci/fuzz: one
# instrumented test binary per package, targets found in the sources).
FUZZJOBS ?= 2
fuzz:
	GO=$(GO) FUZZTIME=$(FUZZTIME) FUZZJOBS=$(FUZZJOBS) bash .ci/fuzz

# Install the peer tools the end-to-end tests use (Debian, as root).
peers:
	apt-get update -q
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(PEERS)
