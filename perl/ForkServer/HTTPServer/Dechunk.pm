package ForkServer::HTTPServer::Dechunk;
use strict;
use warnings;

=head1 NAME

ForkServer::HTTPServer::Dechunk - undo the chunked framing an app put on its own body

=head1 SYNOPSIS

  my $d = ForkServer::HTTPServer::Dechunk->new;
  my $bytes = $d->feed($piece);    # the data of the chunks complete so far
  $d->done;                        # true once the last chunk was read

=head1 DESCRIPTION

Some apps frame their body in chunks themselves and say
C<Transfer-Encoding: chunked> in their headers (Mojolicious's
C<write_chunk> under PSGI). An HTTP/1.0 client must not get that encoding
(RFC 9112, section 6.1): it would read the chunk sizes as text. The server
then drops the header, feeds the app's body pieces through this decoder,
sends the data, and ends the body by closing the connection.

C<feed> takes the app's bytes in any pieces (a size line or a chunk may be
split anywhere) and returns the data they complete. What follows the last
chunk (trailers) is dropped; so is framing it cannot read (the rest is
then passed through as it is, so no byte the app meant is lost).

=cut

sub new {
    my ($class) = @_;
    return bless { buf => '', left => 0, state => 'size' }, $class;
}

sub done { return $_[0]{state} eq 'end' }

sub feed {
    my ($self, $piece) = @_;
    return '' unless defined $piece && length $piece;
    return $piece if $self->{state} eq 'raw';
    return '' if $self->{state} eq 'end';
    $self->{buf} .= $piece;
    my $out = '';
    while (length $self->{buf}) {
        if ($self->{state} eq 'data') {
            my $n = $self->{left} < length $self->{buf} ? $self->{left} : length $self->{buf};
            $out .= substr($self->{buf}, 0, $n, '');
            $self->{state} = 'crlf' unless $self->{left} -= $n;
        }
        elsif ($self->{state} eq 'crlf') {
            last if length $self->{buf} < 2;
            return $out . $self->_raw unless substr($self->{buf}, 0, 2) eq "\015\012";
            substr($self->{buf}, 0, 2, '');
            $self->{state} = 'size';
        }
        else {    # size: hex digits, maybe extensions, CRLF
            my $eol = index $self->{buf}, "\015\012";
            if ($eol < 0) {
                return $out . $self->_raw if length $self->{buf} > 1024;
                last;
            }
            my $line = substr($self->{buf}, 0, $eol + 2, '');
            my ($hex) = $line =~ /\A([0-9A-Fa-f]{1,15})[ \t]*(?:;[^\015]*)?\015\012\z/
                or do { $self->{buf} = $line . $self->{buf}; return $out . $self->_raw };
            if (hex $hex) { ($self->{left}, $self->{state}) = (hex $hex, 'data') }
            else          { ($self->{buf}, $self->{state}) = ('', 'end'); last }
        }
    }
    return $out;
}

# framing it cannot read: what is left, and all that follows, as it is
sub _raw {
    my ($self) = @_;
    $self->{state} = 'raw';
    return substr($self->{buf}, 0, length $self->{buf}, '');
}

1;
