# Sourced (sh) by docker/Dockerfile's pip steps: BuildKit secrets → pip's environment, for that
# one RUN only. /run/secrets/pip_index_url holds an index URL (credentials may be in it);
# /run/secrets/ca_bundle a PEM bundle that the index's certificate chains to. Either may be
# absent (then pip's defaults apply).
if [ -s /run/secrets/pip_index_url ]; then
  PIP_INDEX_URL=$(cat /run/secrets/pip_index_url)
  export PIP_INDEX_URL
fi
if [ -s /run/secrets/ca_bundle ]; then
  export PIP_CERT=/run/secrets/ca_bundle
  # requests/urllib3 inside pip read these too (e.g. for a proxy in front of the index)
  export REQUESTS_CA_BUNDLE=/run/secrets/ca_bundle SSL_CERT_FILE=/run/secrets/ca_bundle
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=${PIP_DEFAULT_TIMEOUT:-120}
