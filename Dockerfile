# dkimgw: build with Go, run on Debian 12 slim with SoftHSM.
#   docker build -t dkimgw .
#   docker run -v /etc/dkimgw:/etc/dkimgw:ro -v dkimgw-data:/var/lib/dkimgw \
#     -v dkimgw-tokens:/var/lib/softhsm/tokens -e DKIMGW_PIN=... dkimgw
# With a real HSM, add the vendor's PKCS#11 library (and its client
# configuration) to the image or mount it, and name it in hsm.uri.

FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
# The patched go-smtp and miekg/pkcs11 that go.mod's replace lines name:
# without them go mod download fails.
COPY third_party ./third_party
RUN go mod download
COPY . .
# cgo: the PKCS#11 binding loads the token's library at run time.
RUN CGO_ENABLED=1 go build -trimpath -o /out/dkimgw ./cmd/dkimgw

FROM debian:12-slim
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends softhsm2 opensc ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# A user of its own, in group softhsm (Debian's softhsm2.conf and token
# directory belong to that group).
RUN useradd --system --home-dir /var/lib/dkimgw --shell /usr/sbin/nologin --groups softhsm dkimgw \
 && install -d -o dkimgw -g dkimgw -m 0750 /var/lib/dkimgw \
 && install -d -o dkimgw -g softhsm -m 2770 /var/lib/softhsm/tokens
COPY --from=build /out/dkimgw /usr/local/bin/dkimgw
USER dkimgw
WORKDIR /var/lib/dkimgw
# The data directory (audit log, rotation state) and SoftHSM's tokens.
VOLUME ["/var/lib/dkimgw", "/var/lib/softhsm/tokens"]
# smtp.listen and admin.listen of deploy/compose/dkimgw.yaml.
EXPOSE 10025 9465
ENTRYPOINT ["dkimgw", "serve"]
CMD ["--config", "/etc/dkimgw/dkimgw.yaml"]
