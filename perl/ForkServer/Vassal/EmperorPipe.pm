package ForkServer::Vassal::EmperorPipe;
use strict;
use warnings;

use Fcntl qw(F_GETFD F_SETFD FD_CLOEXEC);
use ForkServer::Protocol qw(read_packet MODIFIER1_CONFIG);
use ForkServer::Vassal::Output ();

=head1 NAME

ForkServer::Vassal::EmperorPipe - the vassal's end of the Emperor pipe and config pipe

=head1 SYNOPSIS

  use ForkServer::Protocol qw(SPAWNED);    # the bytes' names
  my $pipe = ForkServer::Vassal::EmperorPipe->pipe_from_env;     # undef without an Emperor
  ForkServer::Vassal::EmperorPipe->send($pipe, SPAWNED);
  my ($text, $fh) = ForkServer::Vassal::EmperorPipe->config_from_env;    # () without a config pipe

=head1 DESCRIPTION

The descriptors are named by C<UWSGI_EMPEROR_FD> and
C<UWSGI_EMPEROR_FD_CONFIG>. Both are made close-on-exec: a program the app
runs must not hold the vassal's pipe (the Emperor would never see its end
of file).

=cut

sub set_cloexec {
    my ($class, $fh) = @_;
    my $flags = fcntl($fh, F_GETFD, 0);
    fcntl($fh, F_SETFD, $flags | FD_CLOEXEC) if defined $flags;
    return 1;
}

sub _open_fd_from_env {
    my ($class, $var) = @_;
    my $fd = $ENV{$var};
    return undef unless defined $fd && length $fd;
    die "$var='$fd' is not a descriptor number\n" unless $fd =~ /\A\d+\z/;
    open(my $fh, '+<&=', $fd) or die "$var=$fd: cannot use descriptor: $!\n";
    binmode $fh;
    $class->set_cloexec($fh);
    return $fh;
}

sub pipe_from_env   { $_[0]->_open_fd_from_env('UWSGI_EMPEROR_FD') }
sub config_fh_from_env { $_[0]->_open_fd_from_env('UWSGI_EMPEROR_FD_CONFIG') }

# Reads the configuration packet (modifier1 115) from the config pipe.
# Returns (text, handle): the handle stays open so that the vassal can ask
# for its config again with byte 2.
sub config_from_env {
    my ($class) = @_;
    ForkServer::Vassal::Output::statement_flushed() if defined $ENV{UWSGI_EMPEROR_FD};
    my $fh = $class->config_fh_from_env or return;
    ForkServer::Vassal::Output::take_from_config_pipe($fh);
    my ($mod1, undef, $body) = eval { read_packet($fh) };
    die "config pipe: $@" unless defined $mod1;
    die "config pipe: expected a packet with modifier1 " . MODIFIER1_CONFIG . ", got $mod1\n" unless $mod1 == MODIFIER1_CONFIG;
    return ($body, $fh);
}

# One byte to the Emperor. A vassal without an Emperor sends nothing; a gone
# Emperor is noticed by the reader of the pipe, not here.
sub send {
    my ($class, $fh, $byte) = @_;
    return unless $fh;
    local $SIG{PIPE} = 'IGNORE';
    return syswrite($fh, chr $byte) == 1;
}

1;
