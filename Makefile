# xdplb: build, demo, tests.
#   make demo   - install what is needed, build, run the demo (as root)
#   make test   - install what is needed, build, run the test suite (as root)
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BPF_OBJ := bpf/xdp/xdplb.o
BPF_SRC := $(wildcard bpf/xdp/*.c bpf/xdp/*.h)
CLANG ?= clang
BPF_CFLAGS := -O2 -g -target bpf -Wall -Werror -I/usr/include/$(shell uname -m)-linux-gnu
APT_PKGS := clang llvm libbpf-dev bpftool iptables nftables iproute2 ethtool curl python3-venv

.PHONY: all bpf deps apt venv demo test clean install

all: bpf

bpf: $(BPF_OBJ)

$(BPF_OBJ): $(BPF_SRC)
	$(CLANG) $(BPF_CFLAGS) -c bpf/xdp/xdplb.c -o $@

apt:
	@if ! dpkg -s $(APT_PKGS) >/dev/null 2>&1; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PKGS); fi

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q -U pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

deps: apt venv bpf
	@mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf

demo: deps
	$(VENV)/bin/xdplb demo

test: deps
	$(VENV)/bin/python -m pytest -q tests

clean:
	rm -f $(BPF_OBJ)
