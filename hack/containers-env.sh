# Sourced by hack/build-images.sh and the exec node's callers: one podman/buildah storage and
# config under ~/.cache/temper (written by hack/setup-host.sh), shared by builds and pods.
TEMPER_CONTAINERS=${TEMPER_CACHE:-$HOME/.cache/temper}/containers
export CONTAINERS_STORAGE_CONF=$TEMPER_CONTAINERS/storage.conf
export CONTAINERS_CONF=$TEMPER_CONTAINERS/containers.conf
