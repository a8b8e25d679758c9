# enclave-net with Nix: both daemons as static binaries, and an enclave image (EIF) built with
# monzo's aws-nitro-util whose entrypoint follows the start sequence of the README ("Starting in
# the enclave"): enclave-proxy, wait for it, dockerd on iptables-legacy, then the application.
#
#   nix build ./nix#enclave-proxy ./nix#host-proxy   static binaries (musl)
#   nix build ./nix#eif                              the enclave image
#
# Not built by this project's CI, which cannot fetch nixpkgs: it only checks that the files
# parse (nix-instantiate --parse). See README, "Nix".
{
  description = "enclave-net: Docker networking for AWS Nitro Enclaves over vsock";

  inputs = {
    # The workspace needs Rust 1.91 or newer (vendor/smoltcp: edition 2024, rust-version 1.91);
    # nixos-24.11's 1.82 cannot read its manifests.
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";
    nitro-util.url = "github:monzo/aws-nitro-util";
    nitro-util.inputs.nixpkgs.follows = "nixpkgs";
  };

  outputs = { self, nixpkgs, nitro-util }:
    let
      system = "x86_64-linux";
      pkgs = nixpkgs.legacyPackages.${system};
      nitro = nitro-util.lib.${system};

      # The workspace, built static (pkgsStatic: musl, no libraries to copy into an image).
      # The tests need root, namespaces and TAP devices, so they are not run here.
      daemons = pkgs.pkgsStatic.rustPlatform.buildRustPackage {
        pname = "enclave-net";
        version = "0.1.0";
        src = ./..;
        cargoLock.lockFile = ../Cargo.lock;
        cargoBuildFlags = [ "-p" "enclave-proxy" "-p" "host-proxy" ];
        doCheck = false;
      };

      only = name: pkgs.runCommand name { } ''
        mkdir -p $out/bin
        cp ${daemons}/bin/${name} $out/bin/
      '';

      startScript = pkgs.runCommand "enclave-start" { } ''
        mkdir -p $out/bin
        cp ${./enclave-start.sh} $out/bin/enclave-start
        chmod +x $out/bin/enclave-start
      '';
    in
    {
      packages.${system} = rec {
        enclave-proxy = only "enclave-proxy";
        host-proxy = only "host-proxy";

        # The enclave image: AWS's Nitro kernel, init (init.c, rather than aws-nitro-util's own)
        # and NSM module, from aws-nitro-util's blobs; a root with enclave-proxy, busybox,
        # iptables-legacy and Docker. Docker's wrapper puts its own iptables first on its PATH,
        # nixpkgs' nftables-based one by default: the enclave kernel has no nf_tables, so it
        # gets iptables-legacy, and loses what an enclave has no use for.
        eif = nitro.buildEif {
          name = "enclave-net";
          arch = "x86_64";
          inherit (nitro.blobs.x86_64) kernel kernelConfig nsmKo init;
          copyToRoot = pkgs.buildEnv {
            name = "enclave-net-root";
            paths = [
              enclave-proxy
              startScript
              pkgs.busybox
              pkgs.iptables-legacy
              (pkgs.docker.override {
                iptables = pkgs.iptables-legacy;
                withSystemd = false;
                withLvm = false;
                withBtrfs = false;
                buildxSupport = false;
                composeSupport = false;
              })
            ];
            pathsToLink = [ "/bin" "/sbin" "/etc" "/libexec" ];
          };
          entrypoint = "/bin/enclave-start";
          env = ''
            PATH=/bin:/sbin
            DOCKER_INSECURE_NO_IPTABLES_RAW=1
          '';
        };

        default = eif;
      };
    };
}
