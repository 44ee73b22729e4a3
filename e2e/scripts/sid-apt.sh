# Sourced: Debian sid's packages through a private apt state, so nothing is installed system-wide.
#   sid_apt_setup DIR   makes DIR/apt (sources from the machine's own Debian mirror), updates the lists, and
#                       sets the array `sid_apt` to the options every apt-get/apt-cache call then takes.

sid_apt_setup() {
  local dir="$1/apt" mirror=""
  mkdir -p "$dir"/{lists/partial,cache/archives/partial}
  if [[ -f /etc/apt/sources.list.d/debian.sources ]]; then
    mirror="$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)"
  fi
  if [[ -z "$mirror" ]]; then
    mirror="$(awk '$1 == "deb" && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; exit}}' \
      /etc/apt/sources.list 2>/dev/null || true)"
  fi
  [[ -n "$mirror" ]] || { echo "no Debian mirror found in the apt sources" >&2; return 1; }
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror sid main" >"$dir/sources.list"
  : >"$dir/status"
  sid_apt=(-o "Dir::Etc::sourcelist=$dir/sources.list" -o Dir::Etc::sourceparts=/dev/null
    -o "Dir::State::Lists=$dir/lists" -o "Dir::Cache=$dir/cache" -o "Dir::State::status=$dir/status"
    -o APT::Architecture=amd64 -o Debug::NoLocking=1 -o APT::Sandbox::User=root)
  apt-get "${sid_apt[@]}" -qq update
}
