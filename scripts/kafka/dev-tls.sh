#!/usr/bin/env bash
# Makes throwaway TLS material and SASL users for a local secured broker (scripts/kafka.sh),
# with openssl: a CA, a broker certificate for 127.0.0.1/localhost, a client certificate
# (mutual TLS) and a users file with random passwords. For development only.
#
# Usage: scripts/kafka/dev-tls.sh DIR
#
# Then, for example:
#   KAFKA_PORT=9092 KAFKA_SASL_SSL_PORT=9094 KAFKA_SSL_PORT=9095 \
#   KAFKA_SSL_CERT=DIR/broker.crt KAFKA_SSL_KEY=DIR/broker.key KAFKA_SSL_CA=DIR/ca.crt \
#   KAFKA_SASL_USERS_FILE=DIR/sasl-users scripts/kafka.sh start
# and the service with RFP_KAFKA__SECURITY_PROTOCOL=SASL_SSL, RFP_KAFKA__SSL_CAFILE=DIR/ca.crt,
# RFP_KAFKA__SASL_MECHANISM=SCRAM-SHA-512, RFP_KAFKA__SASL_USERNAME=poller and
# RFP_KAFKA__SASL_PASSWORD_FILE=DIR/poller.password (see docs/security.md).
set -euo pipefail

dir="${1:?usage: $0 DIR}"
command -v openssl > /dev/null || { echo "dev-tls.sh: openssl not found" >&2; exit 1; }
mkdir -p "$dir"
cd "$dir"
umask 077

ec=(-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes)  # -nodes: unencrypted PKCS#8 keys
openssl req -x509 "${ec[@]}" -keyout ca.key -out ca.crt -days 30 \
  -subj "/O=rightfoot-poller dev/CN=rightfoot-poller dev CA" \
  -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" 2> /dev/null

issue() { # name extension-lines
  local name="$1" ext="$2"
  openssl req "${ec[@]}" -keyout "$name.key" -out "$name.csr" \
    -subj "/O=rightfoot-poller dev/CN=$name" 2> /dev/null
  openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 \
    -out "$name.crt" -extfile <(printf '%b' "$ext") 2> /dev/null
  rm -f "$name.csr"
}
issue broker "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n"
issue client "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n"

password="$(openssl rand -hex 16)"
printf '%s\n' "$password" > poller.password
printf 'poller %s\n' "$password" > sasl-users
chmod 644 ca.crt broker.crt client.crt
echo "dev-tls.sh: wrote ca.crt, broker.crt/.key, client.crt/.key, sasl-users (user poller)" \
  "and poller.password in $dir" >&2
