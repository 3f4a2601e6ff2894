# The Perl side (perl/: the vassal program ForkServer.pm and
# Plack::Handler::ForkServer) for CPAN users: cpanm --installdeps .
# Debian's packages of the same are in the Makefile's RUNTIME_DEB_PACKAGES.
# The versions are Debian 12's, the ones tested; older ones may work.
requires 'perl', '5.036';
requires 'Plack', '1.0050';             # Plack::Util, plackup -s ForkServer
requires 'HTTP::Parser::XS', '0.17';    # request heads
requires 'HTTP::Status';                # HTTP::Message: reason phrases
requires 'Socket::MsgHdr', '0.05';      # descriptors over the fork-server socket
requires 'File::Map', '0.67';           # the HTTP workers' shared desk (optional: without it, no taking)
# core modules, named for perls that split them out
requires 'JSON::PP';
requires 'IO::Socket::IP';
requires 'Time::HiRes';

on 'test' => sub {
    requires 'Test::More', '0.98';
    requires 'Test::TCP';
    requires 'Plack::Test::Suite';      # Plack's server conformance suite
};
