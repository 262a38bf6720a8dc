FROM python:3.11-slim
WORKDIR /srv/edgeproxy
COPY pyproject.toml README.md ./
COPY edgeproxy ./edgeproxy
RUN pip install --no-cache-dir . && useradd --system --no-create-home edgeproxy \
    && mkdir -p certs conf && chown edgeproxy certs
COPY conf/edgeproxy.toml ./conf/edgeproxy.toml
# Port 443 without root: grant the bind capability to the interpreter, not the whole user.
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends libcap2-bin \
    && setcap 'cap_net_bind_service=+ep' "$(readlink -f "$(which python3)")" \
    && apt-get purge -y -qq libcap2-bin && rm -rf /var/lib/apt/lists/*
USER edgeproxy
EXPOSE 443 9100
ENV EDGEPROXY_METRICS_LISTEN='"0.0.0.0:9100"'
CMD ["edgeproxy", "serve", "--config", "conf/edgeproxy.toml"]
