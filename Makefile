# xdplb: build, demo, tests.
#   make demo   - install what is needed, build, run the demo (as root)
#   make test   - install what is needed, build, run the test suite (as root)
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BPF_OBJ := bpf/xdp/xdplb.o
BPF_SRC := $(wildcard bpf/xdp/*.c bpf/xdp/*.h)
# The backend side of DSR (xdplb backend attach): its own object.
DECAP_OBJ := bpf/decap/decap.o
DECAP_SRC := $(wildcard bpf/decap/*.c bpf/decap/*.h) bpf/xdp/csum.h
CLANG ?= clang
BPF_CFLAGS := -O2 -g -target bpf -Wall -Werror -I/usr/include/$(shell uname -m)-linux-gnu
APT_PKGS := clang llvm libbpf-dev bpftool iptables nftables iproute2 ethtool curl python3-venv bird2

.PHONY: all bpf bench-bpf bench-micro bench-micro-save deps apt venv demo test clean install k8s-bins

all: bpf

bpf: $(BPF_OBJ) $(DECAP_OBJ)

$(BPF_OBJ): $(BPF_SRC)
	$(CLANG) $(BPF_CFLAGS) -c bpf/xdp/xdplb.c -o $@

$(DECAP_OBJ): $(DECAP_SRC)
	$(CLANG) $(BPF_CFLAGS) -c bpf/decap/decap.c -o $@

# The benchmark's own programs: generator, sink, bare forwarder.
BENCH_BPF_OBJS := $(patsubst %.c,%.o,$(wildcard bench/bpf/*.c))

bench-bpf: $(BENCH_BPF_OBJS)

bench/bpf/%.o: bench/bpf/%.c bench/bpf/bench.h bench/bpf/shared.h bpf/xdp/flow.h
	$(CLANG) $(BPF_CFLAGS) -c $< -o $@

apt:
	@if ! dpkg -s $(APT_PKGS) >/dev/null 2>&1; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PKGS); fi

# The interpreter a venv comes from: a .venv that another Python made (a
# previous job's, a dangling one) is made again from scratch.
PY_ID = $(shell $(1) -c 'import sys; print(sys.base_prefix, *sys.version_info[:3])' 2>/dev/null)
ifneq ($(call PY_ID,$(VENV)/bin/python),$(call PY_ID,$(PY)))
VENV_CLEAR := --clear
.PHONY: $(VENV)/.installed
endif

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV_CLEAR) $(VENV)
	$(VENV)/bin/pip install -q -U pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

deps: apt venv bpf bench-bpf
	@mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf

demo: deps
	$(VENV)/bin/xdplb demo

test: deps k8s-bins
	XDPLB_K8S_BIN=$(K8S_BIN) $(VENV)/bin/python -m pytest -q tests

# The real Kubernetes control plane for the tests (bench/k8s_cluster.py):
# etcd, kube-apiserver, kube-controller-manager and kube-proxy, built from the
# Go modules pinned in k8s/go.mod into a cache outside the checkout, rebuilt
# only when k8s/go.mod, go.sum or k8s/cmd change (the stamp holds their hash).
# Cold: Go downloads ~1 GB of modules and compiles for 10-25 min on 2 cores
# (README, "Kubernetes mode"); warm: a hash check.
K8S_BIN ?= /var/cache/xdplb/k8s/bin
K8S_SRC := k8s/go.mod k8s/go.sum k8s/tools.go $(wildcard k8s/cmd/*/*.go)
K8S_HASH = $(shell cat $(K8S_SRC) | sha256sum | cut -c1-16)

k8s-bins:
	@if [ "$$(cat $(K8S_BIN)/.stamp 2>/dev/null)" != "$(K8S_HASH)" ]; then \
	  command -v go >/dev/null || { echo "k8s-bins: Go >= 1.26 is needed (https://go.dev/dl)"; exit 1; }; \
	  echo "building the Kubernetes test binaries into $(K8S_BIN) (cold: 10-25 min)"; \
	  mkdir -p $(K8S_BIN) && cd k8s && go build -trimpath -buildvcs=false -ldflags=-s -o $(K8S_BIN)/ \
	    ./cmd/etcd k8s.io/kubernetes/cmd/kube-apiserver \
	    k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kube-proxy && \
	  echo $(K8S_HASH) > $(K8S_BIN)/.stamp; fi

# Microbenchmarks (pytest-benchmark in bench/micro), judged by ratios to a
# reference measured in the same run against bench/micro/baseline.json, never
# by absolute times (bench/microgate.py). bench-micro-save records the
# baseline (5 runs; on a quiet machine).
bench-micro: deps
	$(VENV)/bin/python -m bench.microgate

bench-micro-save: deps
	$(VENV)/bin/python -m bench.microgate --save --runs 5

# make install: a venv under $(PREFIX) with xdplb installed from this tree (not
# editable), the BPF object (the unit points XDPLB_OBJECT at it), the systemd
# unit, and the example config unless one exists. PREFIX/CONFDIR/UNITDIR may
# point elsewhere (the paths in the unit follow); systemctl daemon-reload runs
# only if systemd is the init system.
PREFIX ?= /opt/xdplb
CONFDIR ?= /etc/xdplb
UNITDIR ?= /etc/systemd/system

install: bpf
	install -d -m 0755 $(PREFIX) $(CONFDIR) $(UNITDIR)
	$(PY) -m venv $(PREFIX)/venv
	$(PREFIX)/venv/bin/pip install -q .
	rm -rf build
	install -m 0644 $(BPF_OBJ) $(PREFIX)/xdplb.o
	install -m 0644 $(DECAP_OBJ) $(PREFIX)/decap.o
	sed -e 's|/opt/xdplb|$(PREFIX)|g' -e 's|/etc/xdplb|$(CONFDIR)|g' systemd/xdplb.service \
	  > $(UNITDIR)/xdplb.service
	chmod 0644 $(UNITDIR)/xdplb.service
	@if [ -e $(CONFDIR)/xdplb.yaml ]; then echo "kept the existing $(CONFDIR)/xdplb.yaml"; \
	else install -m 0644 systemd/xdplb.yaml $(CONFDIR)/xdplb.yaml; \
	  echo "installed an example $(CONFDIR)/xdplb.yaml: edit interfaces and services"; fi
	@if [ -d /run/systemd/system ]; then systemctl daemon-reload; \
	else echo "systemd is not the init system here: skipped systemctl daemon-reload"; fi
	@echo "then: systemctl enable --now xdplb"

clean:
	rm -f $(BPF_OBJ) $(DECAP_OBJ) $(BENCH_BPF_OBJS)
