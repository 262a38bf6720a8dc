# Build stage: the beacon path compiled by mypyc (setup.py) needs gcc and mypy, which the
# image that runs does not, and the C connections (tls/_conn.c) OpenSSL's headers.
FROM python:3.11-slim AS build
WORKDIR /src
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends gcc libc6-dev libssl-dev \
    && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml setup.py README.md ./
COPY edgeproxy ./edgeproxy
# The runtime dependencies first (mypyc type-checks against them), then the package again,
# compiled; the check runs from / so that it imports the installed package, not ./edgeproxy.
RUN pip install --no-cache-dir "setuptools>=70.1" mypy==2.4.1 . \
    && EDGEPROXY_COMPILE=1 pip install --no-cache-dir --no-build-isolation --no-deps \
       --force-reinstall . \
    && cd / && python -c "import edgeproxy.proxy.forward as f; assert f.__file__.endswith('.so')" \
    && pip uninstall -y -q mypy

FROM python:3.11-slim
WORKDIR /srv/edgeproxy
COPY --from=build /usr/local/lib/python3.11/site-packages /usr/local/lib/python3.11/site-packages
COPY --from=build /usr/local/bin/edgeproxy /usr/local/bin/edgeproxy
RUN useradd --system --no-create-home edgeproxy && mkdir -p certs conf && chown edgeproxy certs
COPY conf/edgeproxy.toml ./conf/edgeproxy.toml
# Port 443 without root: grant the bind capability to the interpreter, not the whole user.
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends libcap2-bin \
    && setcap 'cap_net_bind_service=+ep' "$(readlink -f "$(which python3)")" \
    && apt-get purge -y -qq libcap2-bin && rm -rf /var/lib/apt/lists/*
USER edgeproxy
EXPOSE 443 9100
ENV EDGEPROXY_METRICS_LISTEN='"0.0.0.0:9100"'
CMD ["edgeproxy", "serve", "--config", "conf/edgeproxy.toml"]
