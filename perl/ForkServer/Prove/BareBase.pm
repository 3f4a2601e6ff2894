package ForkServer::Prove::BareBase;
use strict;
use warnings;

use POSIX ();

=head1 NAME

ForkServer::Prove::BareBase - the second fork server of C<emperor prove>, with none of the suite's modules loaded

=head1 SYNOPSIS

  # in ForkServer::Prove::TestFile::serve, after our own code and Test2,
  # before the preloads:
  if (ForkServer::Prove::BareBase::clone($fd)) {    # true in the clone
      ForkServer::Prove::BareBase::take_place(\@base_argv);
  }

=head1 DESCRIPTION

With C<--bare-pipe-fd N> and the config item C<bare=1>, the base for tests
clones itself before its preloads (C<clone> with C<CLONE_PARENT>: the
child of the base's parent, the Emperor side of C<emperor prove>, as an
adopted test is): a second fork server, on F<bare.sock> beside the base's
socket, with descriptor N as its Emperor pipe, its pid in F<bare.pid> and
its C<%INC> keys in the C<--inc-keys> file's name plus C<.bare>. Files that
the preloads would change are forked from it (L<ForkServer::Prove::Source>).

=head2 clone

  my $in_clone = clone($fd);

True in the clone, whose Emperor pipe is now C<$fd> (the base's is closed
in it: the Emperor side must see the base's end of file when the base
dies). False in the base, with C<$fd> closed; also when no clone can be
made (the files then run cold).

=cut

sub clone {
    my ($fd) = @_;
    require ForkServer::Base::Clone;
    my ($ok) = ForkServer::Base::Clone::probe();
    my $pid = $ok ? ForkServer::Base::Clone::clone_parent() : undef;
    if (defined $pid && $pid == 0) {
        POSIX::close($ENV{UWSGI_EMPEROR_FD}) if defined $ENV{UWSGI_EMPEROR_FD};
        $ENV{UWSGI_EMPEROR_FD} = $fd;
        return 1;
    }
    POSIX::close($fd);
    return 0;
}

=head2 take_place

  take_place(\@base_argv);

In the clone: its C<--fork-server> socket is F<bare.sock> beside the
base's, and its pid is written to F<bare.pid> there (whole, by a rename).

=cut

sub take_place {
    my ($argv) = @_;
    for my $i (0 .. $#$argv - 1) {
        next unless $argv->[$i] eq '--fork-server';
        (my $dir = $argv->[$i + 1]) =~ s{/[^/]*\z}{};
        $argv->[$i + 1] = "$dir/bare.sock";
        my $tmp = "$dir/bare.pid.$$";
        open my $fh, '>', $tmp or die "'$tmp': $!\n";
        print $fh $$;
        close $fh or die "'$tmp': $!\n";
        rename $tmp, "$dir/bare.pid" or die "'$dir/bare.pid': $!\n";
    }
    return;
}

1;
